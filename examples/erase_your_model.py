"""Erase a concept from your own SD v1.x model, judge it with your CLIP, export a LoRA, run it in diffusers.

    python examples/erase_your_model.py --model path/to/stable-diffusion-v1-4 \
        --judge path/to/clip-vit-large-patch14 --target "van gogh" --anchor "a painter" --out out/vangogh

``--model`` is a diffusers folder or a single .safetensors file; ``--judge`` any transformers CLIPModel
folder (openai/clip-vit-large-patch14 is the usual one). The same script runs on a GPU or TPU as is: JAX
places the arrays on its default device (install ``jax[cuda12]`` or ``jax[tpu]``). ``--diffusers`` then
loads the LoRA into a diffusers pipeline built from the same model (needs torch) and draws one image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax_erasepro as jep
from jax_erasepro.evaluation import evaluate

TEMPLATES = ["{}", "a photo of {}", "a painting of {}", "an image in the style of {}"]
OTHERS = [
    "a photo of a dog",
    "a city street at night",
    "a bowl of fruit",
    "a portrait of a woman",
    "a mountain lake",
    "a red sports car",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
    parser.add_argument("--judge", required=True, help="a transformers CLIPModel folder")
    parser.add_argument("--target", required=True)
    parser.add_argument("--anchor", default="", help="what the target becomes ('' for a style or nudity)")
    parser.add_argument("--method", default="erasepro")
    parser.add_argument("--out", default="out/your-model")
    parser.add_argument("--images", type=int, default=4, help="images per prompt in the evaluation")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--diffusers", action="store_true", help="also run the LoRA in diffusers (torch)")
    parser.add_argument("--quick", action="store_true", help="1 image per prompt, 2 steps: plumbing only")
    args = parser.parse_args(argv)
    images, steps = (1, 2) if args.quick else (args.images, args.steps)

    sd = jep.load_pretrained(args.model)
    erased, report = jep.erase(sd, [args.target], [args.anchor], method=args.method, prompts=TEMPLATES)
    print(f"{args.method}: edited {len(report.edited)} weights in {report.timings['total']:.1f} s")

    ev = evaluate(
        sd,
        erased,
        [args.target],
        [args.anchor],
        judge=args.judge,
        prompts=TEMPLATES,
        others=OTHERS,
        images_per_prompt=images,
        num_inference_steps=steps,
        robustness=False,
    )
    clip = ev.summary["clip_score"]
    print(
        f"CLIP score  target {clip['T']['value']:.3f}  anchor {clip['A']['value']:.3f}  "
        f"others {clip['O']['value']:.3f} (1 = unchanged)"
    )

    out = Path(args.out)
    jep.save_pretrained(erased, out / "lora", format="lora", base=sd, overwrite=True)
    ev.save(out / "evaluation")
    report.to_json(out / "report.json")
    print(f"wrote {out}/lora, {out}/evaluation, {out}/report.json")
    if args.diffusers:
        run_in_diffusers(
            args.model, out / "lora", f"a painting of {args.target}", out / "diffusers.png", steps
        )
    return ev.summary


def run_in_diffusers(model: str, lora: Path, prompt: str, png: Path, steps: int) -> None:
    """The exported LoRA on the original model in diffusers (PyTorch), one image."""
    import torch
    from diffusers import StableDiffusionPipeline

    if Path(model).is_file():
        pipe = StableDiffusionPipeline.from_single_file(model)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(str(lora))
    image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(png)
    print(f"diffusers with the LoRA: {png}")


if __name__ == "__main__":
    main()
