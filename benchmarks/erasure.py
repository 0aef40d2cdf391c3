"""docs/RESULTS.md: every erasure method on shapes-sd, judged on generated images before and after.

    python benchmarks/erasure.py [--images 2] [--steps 20] [--only zorbly] [--reuse]

Requests: each character -> its shape, two shapes -> other shapes, each painter -> "", the implicit
"stripes" -> "" (measured on the characters that wear them, whose prompts never say stripes), and all five
characters at once. Methods: ErasePro (protected, the default), ErasePro in the paper's plain form, UCE
(the authors' 2023 script), ErasePro-implicit weak and strong (not on the multi-concept request).
Tables in ErasePro's layout plus the ground-truth rates; one image grid per method for the README's
request. Results JSON goes to benchmarks/results/erasure.json after every row; ``--reuse`` keeps the
rows it holds (an interrupted or extended run measures only what is missing). The reading of the tables
is docs/results/summary.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from machine import machine

import jax_erasepro as jep
from jax_erasepro.evaluation import evaluate
from jax_erasepro.shapes import world

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "erasure.json"
SUMMARY = ROOT / "docs" / "results" / "summary.md"  # the reading of the tables, written by hand
METHODS = {
    "ErasePro (protected)": ("erasepro", {}),
    "ErasePro (paper form)": ("erasepro", {"form": "paper"}),
    "UCE (2023 script)": ("uce", {}),
}
IMPLICIT = {
    "ErasePro-implicit weak": ("erasepro-implicit", {}),
    "ErasePro-implicit strong": ("erasepro-implicit", {"strength": "strong"}),
}
# fine-tuning methods at their defaults; minutes per request on a 2-core CPU, so the README's request only
FINETUNE = {
    "ESD-x": ("esd-x", {}),
    "ESD-u": ("esd-u", {}),
    "AC": ("ac", {}),
    "AC (lr 2e-5, 200 steps)": ("ac", {"lr": 2e-5, "steps": 200}),
    "AC (lr 1e-4, 400 steps)": ("ac", {"lr": 1e-4, "steps": 400}),
    "All but One": ("allbutone", {}),
    "Few-shot": ("fewshot", {}),
    "Few-shot (token embedding, lr 1e-3)": ("fewshot", {"train": "token-embedding", "lr": 1e-3}),
}
FINETUNE_TARGET = "zorbly"
# the fine-tuning methods that erase "zorbly" at their defaults, also on one style and the implicit case
FINETUNE_MORE = {k: FINETUNE[k] for k in ("ESD-x", "All but One")}


def requests() -> list[tuple[str, list[str], list[str], dict]]:
    """(group, targets, anchors, methods) of the whole table."""
    every = {**METHODS, **IMPLICIT}
    looks = {c: [world.CHARACTER_LOOK[c][0]] for c in world.CHARACTERS}
    out = [
        ("instance", [c], looks[c], {**every, **FINETUNE} if c == FINETUNE_TARGET else every)
        for c in world.CHARACTERS
    ]
    out += [("instance", ["heart"], ["circle"], every), ("instance", ["moon"], ["square"], every)]
    out += [
        ("style", [p], [""], {**every, **FINETUNE_MORE} if i == 0 else every)
        for i, p in enumerate(world.STYLES)
    ]
    out += [("implicit", ["stripes"], [""], {**every, **FINETUNE_MORE})]
    out += [
        (
            "multi-concept",
            list(world.CHARACTERS),
            [world.CHARACTER_LOOK[c][0] for c in world.CHARACTERS],
            METHODS,
        )
    ]
    return out


def _rate(e: dict | None) -> str:
    return "-" if not e else f"{e['before']:.2f} -> {e['after']:.2f}"


def _value(e: dict | None, digits: int = 3) -> str:
    return "-" if not e else f"{e['value']:.{digits}f}"


def row(name: str, s: dict, seconds: float) -> str:
    cs, kid = s["clip_score"], s["kid"]
    acc = s["clip_accuracy"]["after"]
    rob = [v.get("target_rate") for k, v in s["sets"].items() if k.startswith("robust")]
    robust = " / ".join(f"{r['after']:.2f}" for r in rob if r) or "-"
    return (
        f"| {name} | {_rate(s['target_rate'])} | {_rate(s['anchor_rate'])} | {_rate(s['others_accuracy'])} "
        f"| {robust} | {_value(cs.get('A'))} | {_value(cs.get('T'))} | {_value(cs.get('O'))} | {acc:.2f} "
        f"| {_value(kid.get('A'), 4)} | {_value(kid.get('T'), 4)} | {_value(kid.get('O'), 4)} "
        f"| {seconds:.0f} |"
    )


HEADER = (
    "| method | target rate | anchor rate | others' accuracy | robust target rate (misspelled / scene / "
    "templates) | CLIP A | CLIP T | CLIP O | CLIP acc | KID A | KID T | KID O | s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


NOTES = (
    "The judge is shapes-clip. Rates are before -> after, on the target prompts (10 held-out phrasings per "
    "concept) and on about 21 other prompts covering every concept kind but the target. CLIP A/T/O are "
    "image-image cosines in the judge's space (A: erased target vs original anchor, T: erased vs original "
    "target, O: erased vs original others); CLIP acc is the share of erased target images the judge puts "
    "closer to the target's text than the anchor's; KID is on the judge's image features. Intervals are in "
    "benchmarks/results/erasure.json; definitions in `jax_erasepro/evaluation/__init__.py`."
)


FIGURES = (
    'Images of the README\'s request ("zorbly" -> "star"), original | erased, per method: '
    "[ErasePro protected](results/zorbly_erasepro_target.png) "
    "([others](results/zorbly_erasepro_others.png)), "
    "[paper form](results/zorbly_erasepro-paper_target.png) "
    "([others](results/zorbly_erasepro-paper_others.png)), [UCE](results/zorbly_uce_target.png) "
    "([others](results/zorbly_uce_others.png)), [ESD-x](results/zorbly_esd-x_target.png) "
    "([others](results/zorbly_esd-x_others.png)), [ESD-u](results/zorbly_esd-u_target.png) "
    "([others](results/zorbly_esd-u_others.png)), [AC, lr 1e-4 and 400 steps](results/zorbly_ac_target.png) "
    "([others](results/zorbly_ac_others.png)), [All but One](results/zorbly_all-but-one_target.png) "
    "([others](results/zorbly_all-but-one_others.png)), "
    "[few-shot, token embedding](results/zorbly_few-shot_target.png) "
    "([others](results/zorbly_few-shot_others.png)). Per-layer feature distance and parameter change "
    "(ErasePro's Figure 3): [figures/figure3.png](figures/figure3.png) (`python benchmarks/figures.py`)."
)


def render(results: list[dict], command: str, images: int, steps: int) -> str:
    """RESULTS.md from result rows, in ``requests()`` order, with the hand-written reading of them."""
    by_key = {(tuple(r["targets"]), r["method"]): r for r in results}
    minutes = sum(r["seconds"] for r in results) / 60
    lines = [
        "# Results: erasure methods on shapes-sd, judged on images",
        "",
        f"Made by `{command}` ({minutes:.0f} min of erasing and evaluating, summed over rows) "
        f"on {machine()}; "
        f"{images} images per prompt, {steps} DDIM steps, guidance 7.5, the same noise before and after. "
        + NOTES,
        "",
        FIGURES,
    ]
    if SUMMARY.is_file():
        lines += ["", SUMMARY.read_text().strip()]
    group = None
    for kind, targets, anchors, methods in requests():
        rows = [by_key[(tuple(targets), name)] for name in methods if (tuple(targets), name) in by_key]
        if not rows:
            continue
        if kind != group:
            lines += ["", f"## {kind}"]
            group = kind
        shown = ", ".join(f'"{t}" -> "{a}"' for t, a in zip(targets, anchors, strict=True))
        lines += ["", f"### {shown}", "", HEADER]
        lines += [row(r["method"], r["evaluation"], r["seconds"]) for r in rows]
        later = {}
        for r in rows:
            if r.get("command", command) != command:
                later.setdefault(r["command"], []).append(f"{r['method']} (erase {r['erase_seconds']:.0f} s)")
        lines += [f"\n{', '.join(names)}: made by `{c}`." for c, names in later.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--only", help="run only requests whose first target contains this")
    parser.add_argument("--reuse", action="store_true", help="keep the rows benchmarks/results has already")
    parser.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    sd = jep.load_pretrained()
    command = "python benchmarks/erasure.py " + " ".join(sys.argv[1:] if argv is None else argv)
    saved = json.loads(RESULTS_JSON.read_text()) if args.reuse and RESULTS_JSON.is_file() else {}
    results = saved.get("results", [])
    first = saved.get("command", command)  # the command that made the table; later rows carry their own
    done = {(tuple(r["targets"]), r["method"]) for r in results}
    grids = ROOT / "docs" / "results"
    for kind, targets, anchors, methods in requests():
        if args.only and args.only not in targets[0]:
            continue
        for name, (method, options) in methods.items():
            if (tuple(targets), name) in done:
                continue
            t = time.perf_counter()
            erased, report = jep.erase(sd, targets, anchors, method=method, **options)
            ev = evaluate(
                sd,
                erased,
                targets,
                anchors,
                images_per_prompt=args.images,
                num_inference_steps=args.steps,
                reference=False,
            )
            results.append(
                {
                    "group": kind,
                    "targets": targets,
                    "anchors": anchors,
                    "method": name,
                    "options": options,
                    "seconds": time.perf_counter() - t,
                    "erase_seconds": report.timings["total"],
                    "evaluation": ev.to_dict(),
                    "command": command,
                }
            )
            print(row(name, results[-1]["evaluation"], results[-1]["seconds"]), flush=True)
            if targets == ["zorbly"]:
                folder = ev.save(Path("/tmp") / f"results-{method}-{len(results)}")
                # one grid per method: a method's later variant replaces its earlier one
                slug = name.split(" (")[0].lower().replace(" ", "-") + ("-paper" if "paper" in name else "")
                for part in ("target", "others"):
                    shutil.copy(folder / f"grid_{part}.png", grids / f"zorbly_{slug}_{part}.png")
            # written after every row: an interrupted run keeps what it measured (rerun with --reuse)
            RESULTS_JSON.write_text(json.dumps({"command": first, "results": results}, indent=1) + "\n")
            Path(args.out).write_text(render(results, first, args.images, args.steps))
    print(f"wrote {args.out} and {RESULTS_JSON}")


if __name__ == "__main__":
    main()
