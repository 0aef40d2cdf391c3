#!/usr/bin/env bash
# Train shapes-sd's UNet on an accelerator within a wall-clock budget, then build and judge the candidate.
#
#   bash recipes/shapes_sd/device_unet.sh IN OUT [MINUTES] [SIZE]
#
# IN: a folder written by recipes/shapes_sd/device_stage.py (vae/, text_encoder/, and unet/ to start from, optional).
# OUT: what comes back: the trained UNet's EMA weights (fp16, in pieces of at most 15 MiB: join them with
#   `cat OUT/unet.safetensors.part-* > unet/diffusion_pytorch_model.safetensors`), its config, the judge's
#   rates and image grid (OUT/quality), and the runs' logs.
# MINUTES (default 8): the whole budget. A 150-step calibration run measures steps per second; the real
#   run's --steps (and so its cosine schedule, which must end annealed) is what fits in the rest, less a
#   reserve for compiling, exporting and judging.
# Environment: WORKERS (renderer processes, default 12), BATCH (default 128), RESERVE_S (default 180),
#   JUDGE_N (prompts per part of the bar, default 50), RUN (the run folder, default /tmp/device-unet).
set -euo pipefail
IN=$1; OUT=$2; MINUTES=${3:-8}; SIZE=${4:-f4}
RUN=${RUN:-/tmp/device-unet}
start=$(date +%s)
args=(--size "$SIZE" --batch-size "${BATCH:-128}" --workers "${WORKERS:-12}" --snr-gamma 5
      --vae "$IN/vae" --text-encoder "$IN/text_encoder")
[ -d "$IN/unet" ] && args+=(--init-from "$IN/unet")
rm -rf "$RUN" "$RUN-cal"
progress_off() { tr '\r' '\n' | { grep -vE '[0-9]+/[0-9]+ \[' || true; }; }  # drop tqdm's lines, keep errors
python -m recipes.shapes_sd.train_unet --out "$RUN-cal" --steps 150 "${args[@]}" 2>&1 | progress_off
steps=$(python - "$RUN-cal/log.jsonl" "$start" "$MINUTES" "${RESERVE_S:-180}" <<'PY'
import json, sys, time
log, start, minutes, reserve = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
t = {r["step"]: r["time"] for r in map(json.loads, open(log))}
rate = (150 - 50) / (t[150] - t[50])
left = minutes * 60 - (time.time() - start) - reserve
print(max(250, int(rate * left) // 250 * 250))
print(f"calibration: {rate:.1f} steps/s, {left:.0f} s left to train", file=sys.stderr)
PY
)
echo "training $steps steps"
python -m recipes.shapes_sd.train_unet --out "$RUN" --steps "$steps" "${args[@]}" 2>&1 | progress_off
python -m recipes.shapes_sd.build --vae "$IN/vae" --unet "$RUN/unet" --text-encoder "$IN/text_encoder" \
  --out "$RUN/shapes-sd"
mkdir -p "$OUT"
cp "$RUN/log.jsonl" "$OUT/log.jsonl"
cp "$RUN/shapes-sd/unet/config.json" "$OUT/unet_config.json"  # the built folder's UNet is already fp16
split -b 15M -d "$RUN/shapes-sd/unet/diffusion_pytorch_model.safetensors" "$OUT/unet.safetensors.part-"
python -m jax_erasepro.shapes.judge --model "$RUN/shapes-sd" --n "${JUDGE_N:-50}" --out "$OUT/quality"
echo "done in $(( $(date +%s) - start )) s"
