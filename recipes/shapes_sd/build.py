"""Assemble shapes-sd: the trained VAE and UNet and the CLIP's text tower as one diffusers SD v1 folder.

The folder (fp16 safetensors by default, to fit the size budget) loads in both ``load_pretrained`` and
diffusers' ``StableDiffusionPipeline.from_pretrained``. Its scheduler is SD's (scaled-linear betas, 1000
steps) as DDIM by default: on shapes-sd, PNDM's fourth-order multistep (PLMS) diverges at guidance 7.5 on
some prompts (latents past 10 sigma, drawn as stripes) where DDIM's one-step update does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_erasepro import safefiles
from jax_erasepro.evaluation.judge import load_clip
from jax_erasepro.pipeline import SDConfig, StableDiffusion
from jax_erasepro.saving import save_pretrained
from jax_erasepro.schedulers import CLASS_KINDS, KINDS
from jax_erasepro.shapes.judge import load_vae
from jax_erasepro.tiny import MODEL_INDEX
from jax_erasepro.tokenizer import clip_tokenizer_path, load_tokenizer
from recipes.shapes_sd.train_clip import export as export_clip
from recipes.shapes_sd.train_unet import SCHEDULER, load_text_encoder, load_unet

SCHEDULER_CLASSES = {kind: name for name, kind in CLASS_KINDS.items()}


def assemble(
    vae_dir: str | Path, unet_dir: str | Path, clip_dir: str | Path, scheduler: str = "ddim"
) -> StableDiffusion:
    """The in-memory model from train_vae's ``vae/``, train_unet's ``unet/`` and train_clip's export, sampling
    with ``scheduler`` ("pndm", "ddim" or "ddpm") on the training schedule's betas."""
    if scheduler not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {scheduler!r} (supported: {KINDS})")
    vae, unet, text_encoder = load_vae(vae_dir), load_unet(unet_dir), load_text_encoder(clip_dir)
    width = text_encoder.config.hidden_size
    if {unet.config.cross_dim(i) for i in range(len(unet.config.down_block_types))} != {width}:
        raise ValueError(f"{unet_dir}: cross_attention_dim is not the text encoder's width {width}")
    config = SDConfig(text_encoder=text_encoder.config, unet=unet.config, vae=vae.config,
                      model_index=dict(MODEL_INDEX))
    sampler = dataclasses.replace(SCHEDULER, class_name=SCHEDULER_CLASSES[scheduler])
    tokenizer = load_tokenizer(clip_tokenizer_path())
    return StableDiffusion(text_encoder=text_encoder, unet=unet, vae=vae, tokenizer=tokenizer,
                           scheduler_config=sampler, config=config)


def build(
    vae_dir: str | Path,
    unet_dir: str | Path,
    clip_dir: str | Path,
    out: str | Path,
    *,
    dtype: Any = np.float16,
    overwrite: bool = False,
    scheduler: str = "ddim",
) -> Path:
    """Write shapes-sd's diffusers folder to ``out`` (weights in ``dtype``); returns its path.

    The text encoder's config asks for float32: transformers otherwise computes in the file's dtype
    while diffusers upcasts the UNet, and a default-dtype pipeline would fail on the mismatch.
    """
    sd = assemble(vae_dir, unet_dir, clip_dir, scheduler)
    out = save_pretrained(sd, out, dtype=dtype, overwrite=overwrite)
    config = out / "text_encoder" / "config.json"
    safefiles.write_json(config, json.loads(config.read_text()) | {"dtype": "float32"})
    return out


def build_judge(clip_dir: str | Path, out: str | Path, *, dtype: Any = np.float16) -> Path:
    """Write the judge shapes-clip (a train_clip export) to ``out`` in ``dtype``, as transformers loads it.

    The config asks for float32, so transformers upcasts the fp16 file as diffusers does for shapes-sd.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_clip(load_clip(clip_dir), tmp, dtype)
    config = tmp / "config.json"
    safefiles.write_json(config, json.loads(config.read_text()) | {"dtype": "float32"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: python -m recipes.shapes_sd.build --vae runs/shapes-vae/vae --unet runs/shapes-unet/unet
    --text-encoder runs/shapes-clip-text --out runs/shapes-sd [--judge runs/shapes-judge --judge-out DIR]"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--vae", required=True, help="train_vae's OUT/vae")
    parser.add_argument("--unet", required=True, help="train_unet's OUT/unet")
    parser.add_argument("--text-encoder", required=True, help="train_clip's OUT (its text tower is taken)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--scheduler", choices=KINDS, default="ddim", help="the folder's sampler"
    )
    parser.add_argument("--judge", help="train_clip's OUT of the judge run, written to --judge-out")
    parser.add_argument("--judge-out", help="where the judge goes (e.g. jax_erasepro/assets/shapes-clip)")
    args = parser.parse_args(argv)
    if bool(args.judge) != bool(args.judge_out):
        parser.error("--judge and --judge-out go together")
    if args.judge:
        judge = build_judge(args.judge, args.judge_out, dtype=np.dtype(args.dtype))
        print(f"wrote {judge}")
    out = build(args.vae, args.unet, args.text_encoder, args.out, dtype=args.dtype, overwrite=args.overwrite,
                scheduler=args.scheduler)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
