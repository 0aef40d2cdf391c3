#!/usr/bin/env bash
# Every benchmark on this machine's GPU in one command, within ~8 minutes: benchmarks/device.py, one stage
# per process under its own time limit (a stage that fails or times out is recorded, the next one runs).
#
#   bash benchmarks/device.sh [CONFIG_DIR]     # CONFIG_DIR or $SD14_CONFIGS: SD v1.4's config folder
#                                              # (default: shared/sd-v1-4, tests/data, then the package's)
# Env: OUT (results JSON; default benchmarks/results/gpu/<card>.json), PYTHON, T_PIPELINE, T_ERASE,
# T_FINETUNE, T_EVALUATE (seconds per stage), STAGES (default "pipeline erase finetune evaluate").
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jax_erasepro from this tree, installed or not
export XLA_PYTHON_CLIENT_PREALLOCATE=false              # JAX and torch share the GPU
CONFIGS=${1:-${SD14_CONFIGS:-}}

echo "== imports"
for mod in jax flax jax_erasepro torch diffusers transformers; do
  "$PYTHON" -c "import $mod" 2>/dev/null && echo "  $mod: ok" || echo "  $mod: MISSING (stages that need it record an error)"
done
if ! "$PYTHON" -c "import jax_erasepro" 2>/dev/null; then
  echo "== pip install -e . (offline, no dependencies)"
  "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "  failed"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

if [ -z "${OUT:-}" ]; then
  CARD=$("$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); import device; print(device.slug(device.card_name()))" 2>/dev/null || echo unknown)
  OUT="benchmarks/results/gpu/${CARD}.json"
fi
echo "== results: $OUT"

declare -A LIMIT=([pipeline]=${T_PIPELINE:-140} [erase]=${T_ERASE:-100} [finetune]=${T_FINETUNE:-170} [evaluate]=${T_EVALUATE:-50})
for stage in ${STAGES:-pipeline erase finetune evaluate}; do
  echo "== $stage (limit ${LIMIT[$stage]:-120} s)"
  args=(benchmarks/device.py --out "$OUT" --stages "$stage")
  [ -n "$CONFIGS" ] && args+=(--configs "$CONFIGS")
  timeout -k 10 "${LIMIT[$stage]:-120}" "$PYTHON" "${args[@]}"
  rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "== $stage: timed out (its finished parts are in $OUT)"
  [ $rc -ne 0 ] && echo "== $stage: exit status $rc"
done
echo "== done: $OUT"
cat "$OUT" 2>/dev/null | head -c 20000
