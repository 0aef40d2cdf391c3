"""Assemble shapes-sd: the trained VAE and UNet and the CLIP's text tower as one diffusers SD v1 folder.

The folder (fp16 safetensors by default, to fit the size budget) loads in both ``load_pretrained`` and
diffusers' ``StableDiffusionPipeline.from_pretrained``; its scheduler is SD's PNDM config.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_erasepro import safefiles
from jax_erasepro.pipeline import SDConfig, StableDiffusion
from jax_erasepro.saving import save_pretrained
from jax_erasepro.shapes.train_clip import TOKENIZER_DIR
from jax_erasepro.shapes.train_unet import SCHEDULER, load_text_encoder, load_unet
from jax_erasepro.shapes.train_vae import load_vae
from jax_erasepro.tiny import MODEL_INDEX
from jax_erasepro.tokenizer import load_tokenizer


def assemble(vae_dir: str | Path, unet_dir: str | Path, clip_dir: str | Path) -> StableDiffusion:
    """The in-memory model from train_vae's ``vae/``, train_unet's ``unet/`` and train_clip's export."""
    vae, unet, text_encoder = load_vae(vae_dir), load_unet(unet_dir), load_text_encoder(clip_dir)
    width = text_encoder.config.hidden_size
    if {unet.config.cross_dim(i) for i in range(len(unet.config.down_block_types))} != {width}:
        raise ValueError(f"{unet_dir}: cross_attention_dim is not the text encoder's width {width}")
    config = SDConfig(text_encoder=text_encoder.config, unet=unet.config, vae=vae.config,
                      model_index=dict(MODEL_INDEX))
    return StableDiffusion(text_encoder=text_encoder, unet=unet, vae=vae,
                           tokenizer=load_tokenizer(TOKENIZER_DIR), scheduler_config=SCHEDULER, config=config)


def build(
    vae_dir: str | Path,
    unet_dir: str | Path,
    clip_dir: str | Path,
    out: str | Path,
    *,
    dtype: Any = np.float16,
    overwrite: bool = False,
) -> Path:
    """Write shapes-sd's diffusers folder to ``out`` (weights in ``dtype``); returns its path.

    The text encoder's config asks for float32: transformers otherwise computes in the file's dtype
    while diffusers upcasts the UNet, and a default-dtype pipeline would fail on the mismatch.
    """
    out = save_pretrained(assemble(vae_dir, unet_dir, clip_dir), out, dtype=dtype, overwrite=overwrite)
    config = out / "text_encoder" / "config.json"
    safefiles.write_json(config, json.loads(config.read_text()) | {"dtype": "float32"})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: python -m jax_erasepro.shapes.build --vae runs/shapes-vae/vae --unet runs/shapes-unet/unet
    --text-encoder runs/shapes-clip-text --out runs/shapes-sd"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--vae", required=True, help="train_vae's OUT/vae")
    parser.add_argument("--unet", required=True, help="train_unet's OUT/unet")
    parser.add_argument("--text-encoder", required=True, help="train_clip's OUT (its text tower is taken)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = build(args.vae, args.unet, args.text_encoder, args.out, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
