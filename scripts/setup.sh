#!/usr/bin/env bash
# Idempotent set-up into ./.venv: `scripts/setup.sh` for running, `scripts/setup.sh test` for
# the test tools too. torch is installed first, pinned to 2.13.0, so that pip takes the local
# CPU wheel (find-links) and never swaps in a CUDA build; to use CUDA, install a CUDA build of
# torch 2.13.0 into the venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PY=.venv/bin/python
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
if [ "$extra" = "test" ]; then spec=".[test]"; else spec="."; fi
pip install -e "$spec"
if [ "$extra" = "test" ]; then
  # TGI's own Python client pins huggingface_hub<1 but runs fine with 2.x: no deps.
  pip install --no-deps "text-generation==0.7.0"
fi
"$PY" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
from tokenmill.loader import default_model_path
print(f"torch {torch.__version__}; default model at {default_model_path()}")
PY
