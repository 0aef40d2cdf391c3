"""Erase a character from the embedded shapes-sd model, judge it on images, save the erased model.

    python examples/erase_shapes_sd.py --out out/example          # about 2 minutes on a 2-core CPU
    python examples/erase_shapes_sd.py --out out/example --quick  # seconds: 2 sampling steps, fewer images

shapes-sd's world knows what every image should show, so the evaluation gives ground-truth rates: how
often the target still appears, and how often other prompts still draw what they say.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax_erasepro as jep
from jax_erasepro.erase import METHODS
from jax_erasepro.evaluation import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="out/example", help="where the model and the evaluation go")
    parser.add_argument(
        "--target", default="zorbly", help="a character, painter, shape or colour of the world"
    )
    parser.add_argument("--anchor", default="star", help="what the target becomes")
    parser.add_argument("--preserve", default="quibbet", help="a concept to keep exactly where it was")
    parser.add_argument("--method", default="erasepro", choices=sorted(METHODS))
    parser.add_argument("--quick", action="store_true", help="2 sampling steps: checks the plumbing only")
    args = parser.parse_args(argv)

    sd = jep.load_pretrained()  # the embedded shapes-sd
    erased, report = jep.erase(sd, [args.target], [args.anchor], method=args.method, preserve=[args.preserve])
    print(f"{args.method}: edited {len(report.edited)} weights in {report.timings['total']:.1f} s")

    steps = 2 if args.quick else 20
    ev = evaluate(
        sd,
        erased,
        [args.target],
        [args.anchor],
        images_per_prompt=1,
        num_inference_steps=steps,
        robustness=False,
        reference=False,
    )
    summary = ev.summary
    for name in ("target_rate", "anchor_rate", "others_accuracy"):
        row = summary[name]
        print(f"{name:>16}: {row['before']:.2f} -> {row['after']:.2f}")

    out = Path(args.out)
    jep.save_pretrained(erased, out / "model", overwrite=True)  # a diffusers folder
    ev.save(out / "evaluation")  # JSON, Markdown and before/after grids
    print(f"wrote {out}/model and {out}/evaluation")
    return summary


if __name__ == "__main__":
    main()
