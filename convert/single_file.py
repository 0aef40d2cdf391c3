"""Convert between a CompVis single-file checkpoint and a diffusers folder, keeping every tensor's dtype.

``python -m convert.single_file to-diffusers sd.safetensors OUT_DIR [--config DIFFUSERS_DIR]`` and
``python -m convert.single_file to-single-file DIFFUSERS_DIR OUT.safetensors``. A pickled ``.ckpt`` input
is read through ``convert.ckpt`` (torch ``weights_only``); key rules live in ``jax_erasepro/compvis.py``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert.ckpt import load_ckpt
from jax_erasepro.loading import PICKLED_SUFFIXES, load_pretrained
from jax_erasepro.saving import save_pretrained


def to_diffusers(src: Path, out: Path, config: Path | None = None, overwrite: bool = False) -> Path:
    """A single file (``.safetensors``, or a pickled ``.ckpt`` read safely) -> a diffusers folder."""
    if src.suffix not in PICKLED_SUFFIXES:
        return save_pretrained(load_pretrained(src, config=config), out, overwrite=overwrite)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        converted = Path(tmp) / (src.stem + ".safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in load_ckpt(src).items()}, str(converted))
        return save_pretrained(load_pretrained(converted, config=config), out, overwrite=overwrite)


def to_single_file(src: Path, out: Path, overwrite: bool = False) -> Path:
    """A diffusers folder -> one CompVis ``.safetensors``."""
    return save_pretrained(load_pretrained(src), out, format="single_file", overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-diffusers", help="single file -> diffusers folder")
    a.add_argument("src", type=Path, help="a CompVis .safetensors (or .ckpt)")
    a.add_argument("out", type=Path, help="the diffusers folder to write")
    a.add_argument("--config", type=Path, help="diffusers folder with configs (default: the file's own)")
    b = sub.add_parser("to-single-file", help="diffusers folder -> single file")
    b.add_argument("src", type=Path, help="a diffusers folder")
    b.add_argument("out", type=Path, help="the .safetensors file to write")
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.command == "to-diffusers":
        written = to_diffusers(args.src, args.out, args.config, args.overwrite)
    else:
        written = to_single_file(args.src, args.out, args.overwrite)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
