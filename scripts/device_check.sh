#!/usr/bin/env bash
# The GPU check, run on the lent device machine over a copy of the checkout (see
# scripts/devkit.sh, which packs what it needs here, and how to call it).
#
#   bash scripts/device_check.sh stash   # first call: keep the model's first half in /tmp
#   bash scripts/device_check.sh         # second call: the tests and the benchmark
#
# Every stage runs under its own time limit and writes its log to $OUT as it goes, so a
# stage that fails or runs long still leaves the others' results. DEVICE_CHECK_PYTHON,
# DEVICE_CHECK_ARGS (extra gpu_decode.py arguments) and DEVKIT (the packed folder) let it be
# rehearsed on a CPU machine (tests/test_device_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${DEVICE_CHECK_KIT:-/tmp/tokenmill-kit}
OUT=${OUT:-/tmp/tokenmill-out}
PY=${DEVICE_CHECK_PYTHON:-python3}
DEVKIT=${DEVKIT:-.devkit}
mkdir -p "$KIT" "$OUT"

if [ "${1:-}" = stash ]; then
  cp "$DEVKIT/a/model.part00" "$KIT/" && ls -l "$KIT"
  exit
fi

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/check.log"; }

log "installing the carried wheels"
if ls "$DEVKIT"/b/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$KIT/site" "$DEVKIT"/b/wheels/*.whl 2>&1 | tail -3 | tee -a "$OUT/check.log"
fi
export PYTHONPATH="$PWD/src:$PWD/tests:$KIT/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENMILL_CACHE="$KIT/cache"

log "assembling the default model"
mkdir -p "$TOKENMILL_CACHE"
model_ok=0
if [ -f "$KIT/model.part00" ] && [ -f "$DEVKIT/b/model.part01" ]; then
  cat "$KIT/model.part00" "$DEVKIT/b/model.part01" >"$TOKENMILL_CACHE/model.tmp"
  if "$PY" - "$TOKENMILL_CACHE/model.tmp" <<'EOF' 2>&1 | tee -a "$OUT/check.log"; then
import hashlib, sys
from pathlib import Path
from tokenmill.loader.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256
p = Path(sys.argv[1])
h = hashlib.sha256(p.read_bytes()).hexdigest()
if h != DEFAULT_MODEL_SHA256:
    sys.exit(f"model sha256 {h} != {DEFAULT_MODEL_SHA256}")
p.rename(p.with_name(DEFAULT_MODEL_FILE))
print("model ok")
EOF
    model_ok=1
  else
    rm -f "$TOKENMILL_CACHE/model.tmp"
  fi
else
  log "no model: the first call's half is missing (the machine went cold?)"
fi

log "machine"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())'
  nproc
} 2>&1 | tee -a "$OUT/check.log"

# The CUDA tests: the files that hold them, only the `gpu` ones. Without the model, the two
# that load it (the CUDA engine against the CPU one, the grammar bias) are left out.
log "CUDA tests"
deselect=()
if [ "$model_ok" != 1 ]; then
  deselect=(-k "not test_cuda_engine_matches_cpu and not test_cuda_bias_matches_cpu")
  log "without the model: ${deselect[1]}"
fi
# (tests/test_device_check.py keeps its GPU_TEST_FILES in step with this list)
timeout 220 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${deselect[@]}" \
  tests/models/test_model_parity.py tests/models/test_triton_attention.py \
  tests/lora/test_lora_triton.py tests/guided/test_guided_backend.py \
  tests/e2e/test_batching.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
log "tests exit ${PIPESTATUS[0]}"

# The speed figures of issue 7 (the 8B shape's tokenizer comes from the model too).
if [ "$model_ok" = 1 ]; then
  log "benchmarks/gpu_decode.py"
  # shellcheck disable=SC2086
  timeout 290 "$PY" benchmarks/gpu_decode.py --json "$OUT/gpu.json" ${DEVICE_CHECK_ARGS:-} \
    2>&1 | tee "$OUT/gpu_decode.log" | tail -20
  log "gpu_decode exit ${PIPESTATUS[0]}"
  sed -n '/^| model/,$p' "$OUT/gpu_decode.log" >"$OUT/gpu.md"
fi
log "done"
