"""Stage what ``device_unet.sh`` needs into one small folder that the accelerator call carries.

    python -m recipes.shapes_sd.device_stage --vae runs/shapes-vae4w/vae \
        --text-encoder runs/shapes-clip-text2 [--unet runs/shapes-unet7/unet] --out .device

The text encoder goes as its text tower alone in fp16 (15 MB instead of the CLIP's 34), the UNet to start
from in fp16, the VAE as it is: together they stay far inside the device call's 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jax_erasepro.loading import TEXT_PREFIX
from recipes.shapes_sd.runs import WEIGHTS


def fp16(src: Path, dst: Path, keep: Callable[[str], bool] = lambda k: True) -> None:
    """Copy a safetensors file with its float32 tensors cast to float16, only the keys ``keep`` accepts."""
    tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v
               for k, v in load_file(src).items() if keep(k)}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--text-encoder", required=True, help="train_clip's OUT")
    parser.add_argument("--unet", help="an exported unet/ folder to start from")
    parser.add_argument("--out", default=".device")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(args.vae, out / "vae")
    text = out / "text_encoder"
    text.mkdir(parents=True)
    shutil.copy(Path(args.text_encoder) / "config.json", text)
    fp16(Path(args.text_encoder) / "model.safetensors", text / "model.safetensors",
         lambda k: k.startswith(TEXT_PREFIX))
    if args.unet:
        (out / "unet").mkdir()
        shutil.copy(Path(args.unet) / "config.json", out / "unet")
        fp16(Path(args.unet) / WEIGHTS, out / "unet" / WEIGHTS)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": str(out), "MB": round(size / 1e6, 1)}))


if __name__ == "__main__":
    main()
