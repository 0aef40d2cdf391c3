"""Load a diffusers folder (or a single file with ``--config``) in diffusers and run one tiny generation.

``python -m convert.check_diffusers FOLDER [--steps 2 --size 64]``: exits non-zero if diffusers cannot load
the model or produces non-finite images. It checks what this project exports, from the consumer's side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline


def check(path: Path, config: Path | None = None, steps: int = 2, size: int | None = None) -> np.ndarray:
    """The images (uint8 NHWC) of one generation by diffusers from ``path``; raises if any is non-finite."""
    if path.is_file():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config) if config else None, safety_checker=None, local_files_only=True
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    size = size or 8 * f  # an 8x8 latent: a few seconds even at SD v1.4 size
    with torch.no_grad():
        out = pipe("a photo of a cat", num_inference_steps=steps, height=size, width=size, output_type="np")
    images = out.images
    if not np.isfinite(images).all():
        raise ValueError(f"{path}: diffusers produced non-finite images")
    return (images * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a diffusers folder or a single-file .safetensors")
    parser.add_argument("--config", type=Path, help="diffusers folder with configs, for a single file")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, help="image height and width (default: 8 latent pixels)")
    args = parser.parse_args(argv)
    images = check(args.path, args.config, args.steps, args.size)
    print(f"ok: diffusers generated {images.shape} uint8 images from {args.path}")


if __name__ == "__main__":
    main()
