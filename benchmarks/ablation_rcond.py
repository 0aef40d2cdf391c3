"""ErasePro's rank cutoff on shapes-sd: protected ErasePro at several ``rcond``, judged on images.

    python benchmarks/ablation_rcond.py [--rconds 1e-4 0.01 0.03 0.1 0.3] [--images 1] [--steps 20]

Requests: the five characters at once, "heart" -> "circle", "moon" -> "square" and three painters -> "",
the ones where the cutoff of 1e-4 missed docs/RESULTS.md's bar. Each row is one ``erase(..., rcond=r)`` and
one ``evaluate`` (same noise before and after); prints Markdown rows and writes
benchmarks/results/ablation_rcond.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from erasure import row  # benchmarks/ is on sys.path when this runs as a script

import jax_erasepro as jep
from jax_erasepro.evaluation import evaluate
from jax_erasepro.shapes import world

OUT = Path(__file__).resolve().parent / "results" / "ablation_rcond.json"


def requests() -> list[tuple[list[str], list[str]]]:
    characters = list(world.CHARACTERS)
    return [
        (characters, [world.CHARACTER_LOOK[c][0] for c in characters]),
        (["heart"], ["circle"]),
        (["moon"], ["square"]),
        (["Odile Vantrask"], [""]),
        (["Nadia Frosthelm"], [""]),
        (["Ilse Varnhold"], [""]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rconds", type=float, nargs="+", default=[1e-4, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sd = jep.load_pretrained()
    rows = []
    for targets, anchors in requests():
        for rcond in args.rconds:
            t = time.perf_counter()
            erased, _ = jep.erase(sd, targets, anchors, method="erasepro", rcond=rcond)
            ev = evaluate(
                sd, erased, targets, anchors, images_per_prompt=args.images,
                num_inference_steps=args.steps, reference=False,
            )  # fmt: skip
            rows.append({"targets": targets, "rcond": rcond, "evaluation": ev.to_dict()})
            print(
                f"{', '.join(targets)}",
                row(f"rcond {rcond:g}", ev.to_dict(), time.perf_counter() - t),
                flush=True,
            )
            OUT.write_text(
                json.dumps({"images": args.images, "steps": args.steps, "rows": rows}, indent=1) + "\n"
            )


if __name__ == "__main__":
    main()
