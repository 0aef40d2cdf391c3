"""The ``jax-erasepro`` command line: generate (and, as methods land, erase and report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jax_erasepro.pipeline import StableDiffusion


def load_model(path: str | None) -> StableDiffusion:
    """The model at ``path``; else the embedded default, or a tiny random model while none is shipped."""
    from jax_erasepro.loading import load_pretrained

    if path is not None:
        return load_pretrained(path)
    try:
        return load_pretrained()
    except FileNotFoundError:
        from jax_erasepro.tiny import tiny_random_sd

        print("note: no embedded model installed; using a tiny random model", file=sys.stderr)
        return tiny_random_sd()


def cmd_generate(args: argparse.Namespace) -> None:
    from jax_erasepro.images import save_grid
    from jax_erasepro.pipeline import generate

    sd = load_model(args.model)
    images = generate(
        sd,
        args.prompt,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
    )
    out = save_grid(images, Path(args.out), nrow=len(args.prompt), scale=args.scale)
    print(f"wrote {out} ({len(images)} images)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-erasepro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image sampling to a PNG grid")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    gen.add_argument("--out", default="out/generate.png")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--scheduler", choices=("pndm", "ddim", "ddpm"), default="pndm")
    gen.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
