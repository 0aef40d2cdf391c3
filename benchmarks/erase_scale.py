"""How ErasePro's and UCE's time and memory grow with the number of concepts, on SD v1.4's configs.

Run: ``python benchmarks/erase_scale.py [--sizes 1 10 100 1000] [--preserve 1000]``; each (method, concepts,
preserved) runs in its own process, so its peak resident memory is its own; one call each, compile included
and reported apart. Writes benchmarks/results/erase_scale.json, a markdown table, and
docs/figures/erase_scale.png (seconds and GB against concepts). The model is ``erase.py``'s: random text
encoder and attn2 to_k/to_v, everything else abstract (an erasure never reads it). Targets go to "thing";
preserved concepts are distinct from the targets.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("erasepro", "uce")


def one(method: str, n: int, preserve: int) -> dict:
    """One erasure in this process: seconds by stage and peak resident memory."""
    sys.path.insert(0, str(HERE))
    import erase as bench  # benchmarks/erase.py

    from jax_erasepro import erase

    t0 = time.perf_counter()
    sd = bench.build_sd()
    load_s = time.perf_counter() - t0
    base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    targets, kept = bench.concepts(n), bench.concepts(preserve, start=n)
    t0 = time.perf_counter()
    _, report = erase(sd, targets, "thing", method=method, preserve=kept, prompts=["{}"])
    wall = time.perf_counter() - t0
    t = report.timings
    return {
        "method": method,
        "concepts": n,
        "preserve": preserve,
        "columns": report.columns,
        "seconds": wall,
        "compile_s": t.get("compile"),
        "features_s": t["features"],
        "solve_s": t["solve"],
        "load_s": load_s,
        "model_peak_rss_gb": base_gb,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "max_residual_after": max(e["residual_after"] for e in report.layers),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in METHODS:
        pts = sorted(
            (r["concepts"], r["seconds"], r["peak_rss_gb"])
            for r in rows
            if r["method"] == method and r["preserve"] == 0 and "seconds" in r
        )
        if pts:
            n, s, m = zip(*pts, strict=True)
            ax_t.loglog(n, s, "o-", label=method)
            ax_m.semilogx(n, m, "o-", label=method)
    for ax, label in ((ax_t, "seconds (one call, compile included)"), (ax_m, "peak resident GB")):
        ax.set_xlabel("concepts erased in one call")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("SD v1.4 config, random weights, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}. One call per row in its own process, compile included.",
        "",
        "| method | concepts | preserved | columns | seconds | of which compile | peak GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['concepts']} | {r['preserve']} | - | {r['error']} | | |")
            continue
        c = r["columns"]
        cols = c.get("total") or c["erase"] + c["preserve"]
        comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['method']} | {r['concepts']} | {r['preserve']} | {cols} | {r['seconds']:.1f} | {comp} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--preserve", type=int, nargs="*", default=[1000], help="rows at the largest size")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "erase_scale.json")
    parser.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "figures" / "erase_scale.png")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "PRESERVE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    sys.path.insert(0, str(HERE))
    from machine import machine

    jobs = [(m, n, 0) for m in args.methods for n in args.sizes]
    jobs += [(m, max(args.sizes), p) for m in args.methods for p in args.preserve]
    rows = []
    for method, n, p in jobs:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", method, str(n), str(p)], capture_output=True, text=True
        )
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            rows.append({"method": method, "concepts": n, "preserve": p, "error": tail[:200]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.figure)
    print(table(result))


if __name__ == "__main__":
    main()
