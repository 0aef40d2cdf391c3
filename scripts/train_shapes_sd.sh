#!/usr/bin/env bash
# shapes-sd from nothing with recipes/shapes_sd, as the shipped weights were trained: every stage seeded,
# resumable (rerun the script; a finished stage leaves RUNS/<stage>/.done and is skipped), progress with ETA
# from each trainer.
#
#   bash scripts/train_shapes_sd.sh [RUNS]      # RUNS default: runs (git-ignored)
#
# Stages and their wall time on the 2-core CPU of sessions 16-21 (about 12 h in all; see MODEL_CARD.md):
#   text encoder 35 min, VAE 45 + 25 + 37 min, UNet 4 h 19 + 1 h 36 + 50 min (f4), + 1 h 50 + 1 h 30 min (f4t).
# The UNet was trained in five schedules because sessions last 3 hours; each continues the previous one's EMA
# weights with a fresh optimizer (--init-from). JUDGE=1 also retrains the judge (about 3 h), which ships
# separately and is independent of everything here. OUT (default RUNS/shapes-sd) gets the built folder.
set -euo pipefail
# the recipe (recipes/shapes_sd) is not installed: it imports from this checkout, whatever the working folder
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
RUNS=${1:-runs}
OUT=${OUT:-$RUNS/shapes-sd}

last_step() { ls "$1/ckpt" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true; }  # the last checkpoint, if any
train() {  # train OUT COMMAND...: run COMMAND into OUT, resuming from OUT's last checkpoint if it has one
  local out=$1; shift
  rm -rf "$out"/ckpt/*.orbax-checkpoint-tmp-* 2>/dev/null || true  # a save cut off mid-write
  if [ -n "$(last_step "$out")" ]; then "$@" --out "$out" --resume; else "$@" --out "$out"; fi
}
stage() {  # stage NAME COMMAND...: train RUNS/NAME unless it finished before
  local out=$RUNS/$1; shift
  [ -f "$out/.done" ] || { train "$out" "$@" && touch "$out/.done"; }
}
clip=(python -m recipes.shapes_sd.train_clip --counterfactuals --prompt-supervision)
vae=(python -m recipes.shapes_sd.train_vae --size f4w --edge-loss)
unet=(python -m recipes.shapes_sd.train_unet --snr-gamma 5 --text-encoder "$RUNS/shapes-clip-text2")

# 1. the text encoder (its text tower is shapes-sd's frozen text_encoder): the world's train split only
stage shapes-clip-text2 "${clip[@]}" --steps 2500 --seed 0
# 2. the VAE (factor 4, 16x16x4 latents), then two whole-model fine-tunes on scenes restyled by the painters
stage shapes-vae4w "${vae[@]}" --steps 2000
stage shapes-vae5 "${vae[@]}" --steps 1000 --restyle 0.6 --seed 3 --init-from "$RUNS/shapes-vae4w/vae"
stage shapes-vae6 "${vae[@]}" --steps 1500 --restyle 0.8 --seed 4 --init-from "$RUNS/shapes-vae5/vae"
# 3. the UNet: f4 from scratch, continued, moved onto vae5, grown into f4t (text at 16x16), moved onto vae6
stage shapes-unet10 "${unet[@]}" --size f4 --steps 20000 --vae "$RUNS/shapes-vae4w/vae"
stage shapes-unet11 "${unet[@]}" --size f4 --steps 7000 --seed 1 --lr 2e-4 \
    --init-from "$RUNS/shapes-unet10/unet" --vae "$RUNS/shapes-vae4w/vae"
stage shapes-unet12 "${unet[@]}" --size f4 --steps 4000 --seed 2 --lr 2e-4 \
    --init-from "$RUNS/shapes-unet11/unet" --vae "$RUNS/shapes-vae5/vae"
stage shapes-unet13 "${unet[@]}" --size f4t --steps 4500 --seed 3 --lr 2e-4 \
    --init-from "$RUNS/shapes-unet12/unet" --vae "$RUNS/shapes-vae5/vae"
stage shapes-unet14 "${unet[@]}" --size f4t --steps 3500 --seed 4 --lr 2e-4 \
    --init-from "$RUNS/shapes-unet13/unet" --vae "$RUNS/shapes-vae6/vae"

# 4. (JUDGE=1) the judge, another seed: train split to 1750, then the whole world, then augmented renders
if [ "${JUDGE:-0}" = 1 ] && [ ! -f "$RUNS/shapes-judge/.done" ]; then
  j=$RUNS/shapes-judge
  for s in 1750 3000 4000 6000 8000 9500; do  # each schedule continues the last one's checkpoint
    at=$(last_step "$j"); [ "${at:-0}" -ge $s ] && continue
    extra=(); [ $s -gt 1750 ] && extra+=(--whole-world-from 1750); [ $s -gt 4000 ] && extra+=(--augment)
    train "$j" "${clip[@]}" --steps $s --seed 1 "${extra[@]}"
  done
  touch "$j/.done"
fi

# 5. the folder (fp16, DDIM), then the quality bar (200 prompts per part, with the shipped judge)
python -m recipes.shapes_sd.build --vae "$RUNS/shapes-vae6/vae" --unet "$RUNS/shapes-unet14/unet" \
    --text-encoder "$RUNS/shapes-clip-text2" --out "$OUT" --overwrite
python -m jax_erasepro.shapes.judge --model "$OUT" --n 200 --out "$RUNS/quality"
