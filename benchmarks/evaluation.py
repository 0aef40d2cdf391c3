"""Evaluation throughput: images per second of ``evaluate``'s generation on shapes-sd against diffusers'
``StableDiffusionPipeline`` on the same folder, same prompts, noise, steps, guidance and batch.

Run: ``python benchmarks/evaluation.py [--images 64] [--steps 50] [--batch 32] [--rounds 3]``; writes
benchmarks/results/evaluation.json and a markdown table naming the machine. Ours is
``evaluation.sampling.draw`` (what ``evaluate`` calls, no image cache) on the embedded default model; the
first call compiles and is reported apart; then alternating rounds, the best of each kept. Images agree to
a few uint8 levels (``tests/shapes/test_shipped.py`` bounds it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import jax_erasepro as jep
from jax_erasepro.default_model import default_model_path
from jax_erasepro.evaluation.prompts import world_others
from jax_erasepro.evaluation.sampling import Sampling, _noise, draw

HERE = Path(__file__).resolve().parent


def run(images: int, steps: int, batch: int, rounds: int, out: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, str(HERE))
    from machine import machine

    sd = jep.load_pretrained(default_model_path())
    texts = (world_others([], []) * images)[:images]
    seeds = list(range(images))
    sampling = Sampling(num_inference_steps=steps, images_per_prompt=1, batch_size=batch)
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.stack([_noise(sd, s, 0) for s in seeds]))

    def ours() -> np.ndarray:
        return draw(sd, texts, sampling, seeds=seeds)[:, 0]

    @torch.no_grad()
    def theirs() -> np.ndarray:
        out = []
        for i in range(0, images, batch):
            kw = dict(num_inference_steps=steps, guidance_scale=sampling.guidance_scale, output_type="np")
            out.append(pipe(texts[i : i + batch], latents=latents[i : i + batch], **kw).images)
        return (np.concatenate(out) * 255).round().astype(np.uint8)

    t0 = time.perf_counter()
    first = ours()
    first_s = time.perf_counter() - t0
    best = {"jax_s": np.inf, "torch_s": np.inf}
    for _ in range(rounds):
        t0 = time.perf_counter()
        mine = ours()
        best["jax_s"] = min(best["jax_s"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = theirs()
        best["torch_s"] = min(best["torch_s"], time.perf_counter() - t0)
    assert np.array_equal(first, mine)
    result = {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "images": images,
        "steps": steps,
        "batch": batch,
        "size": int(first.shape[1]),
        "rounds": rounds,
        "jax_first_call_s": first_s,
        **best,
        "jax_images_per_s": images / best["jax_s"],
        "torch_images_per_s": images / best["torch_s"],
        "speedup_vs_torch": best["torch_s"] / best["jax_s"],
        "max_uint8_difference": int(np.abs(mine.astype(int) - ref.astype(int)).max()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(table(result))
    return result


def table(r: dict) -> str:
    return "\n".join(
        [
            f"Machine: {r['machine']}. shapes-sd, {r['images']} images of {r['size']} px, {r['steps']} DDIM "
            f"steps, batch {r['batch']}, best of {r['rounds']} alternating rounds after compile.",
            "",
            "| | images/s | seconds |",
            "| --- | ---: | ---: |",
            f"| JAX (`evaluate`'s draw) | {r['jax_images_per_s']:.2f} | {r['jax_s']:.1f} |",
            f"| diffusers StableDiffusionPipeline | {r['torch_images_per_s']:.2f} | {r['torch_s']:.1f} |",
            f"| JAX / torch | {r['speedup_vs_torch']:.2f}x | |",
            f"| JAX first call (compile included) | | {r['jax_first_call_s']:.1f} |",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "evaluation.json")
    args = parser.parse_args()
    run(args.images, args.steps, args.batch, args.rounds, args.out)
