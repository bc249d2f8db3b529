#!/usr/bin/env bash
# Packs, here, what a GPU check needs on the lent device machine, where nothing can be
# fetched: the default model (98 MB, in two halves: one call carries at most 64 MiB) and the
# wheels of the packages its image lacks (Python 3.12; torch, triton and transformers are
# there). Then two `device` runs in a row (the machine stays warm ~30 s between them):
#
#   bash scripts/devkit.sh
#   run(command="bash scripts/device_check.sh stash", carry=[".devkit/a"], timeout_s=120)
#   run(command="bash scripts/device_check.sh", carry=[".devkit/b"], timeout_s=590)
#
# device_check.sh runs the CUDA tests (`-m gpu`) and benchmarks/gpu_decode.py, and leaves
# their logs, gpu.json and gpu.md in $OUT. If the machine went cold between the calls the
# first half is gone: the check then says so and skips what needs the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
gguf=$("$PY" -c 'from tokenmill.loader import default_model_path; print(default_model_path())')
rm -rf .devkit
mkdir -p .devkit/a .devkit/b/wheels
split -n 2 -d "$gguf" .devkit/part
mv .devkit/part00 .devkit/a/model.part00
mv .devkit/part01 .devkit/b/model.part01
# The packages tokenmill's engine and the CUDA tests import that the device image lacks, at
# the versions installed here (pyproject's pins). No dependencies: each is self-contained or
# needs only what the image has (numpy, pyyaml, requests, tqdm).
pkgs=()
for name in msgspec pyzmq gguf llguidance; do
  pkgs+=("$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")")
done
plats=()
for n in 2_31 2_28 2_27 2_17 2_5 1; do
  plats+=(--platform "manylinux_${n}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${plats[@]}" \
  --platform manylinux2014_x86_64 --platform any -d .devkit/b/wheels "${pkgs[@]}"
ls -l .devkit/a .devkit/b .devkit/b/wheels
du -sh .devkit/a .devkit/b
