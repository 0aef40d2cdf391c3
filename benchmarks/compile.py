"""Compile time on this CPU, first process against a second one reading the on-disk cache.

Run: ``python benchmarks/compile.py``; writes benchmarks/results/compile.json and a markdown table. Two
measurements, each in two fresh processes sharing a new, empty cache folder:

* in Python on shapes-sd: the README request's erasure (``report.timings["compile"]``) and a generation of
  8 images in 20 steps (first call minus a second call of equal shapes), with ``use_compilation_cache``;
* the README's command (``jax-erasepro erase ... --steps 20``) end to end, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = ["erase", "--target", "zorbly", "--anchor", "star", "--preserve", "quibbet", "--steps", "20"]


def child(cache: str) -> dict:
    """One process: compile seconds of an erasure and of a generation, with the cache in ``cache``."""
    from jax_erasepro.compile_cache import use_compilation_cache

    use_compilation_cache(cache)
    import jax_erasepro as jep
    from jax_erasepro.default_model import default_model_path

    t0 = time.perf_counter()
    sd = jep.load_pretrained(default_model_path())
    load_s = time.perf_counter() - t0
    _, report = jep.erase(sd, "zorbly", "star", preserve=["quibbet"])
    prompts = [
        f"a picture of a {c} star"
        for c in ("red", "blue", "green", "pink", "white", "black", "gray", "brown")
    ]
    times = []
    for seed in (0, 1):
        t0 = time.perf_counter()
        jep.generate(sd, prompts, seed=seed, num_inference_steps=20)
        times.append(time.perf_counter() - t0)
    return {
        "load_s": load_s,
        "erase_compile_s": report.timings["compile"],
        "erase_total_s": report.timings["total"],
        "generate_first_s": times[0],
        "generate_second_s": times[1],
        "generate_compile_s": times[0] - times[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compile.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    sys.path.insert(0, str(HERE))
    from machine import machine

    result: dict = {"machine": machine(), "python": [], "cli": []}
    cache = tempfile.mkdtemp(prefix="jep-xla-")
    try:
        for _ in range(2):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", cache], capture_output=True, text=True, check=True
            )
            result["python"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(cache)
        cli = shutil.which("jax-erasepro") or "jax-erasepro"
        env = {**os.environ, "JAX_ERASEPRO_COMPILATION_CACHE": cache}
        for _ in range(2):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                subprocess.run([cli, *README, "--out", out], env=env, capture_output=True, check=True)
                result["cli"].append({"seconds": time.perf_counter() - t0})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(table(result))


def table(r: dict) -> str:
    p, c = r["python"], r["cli"]
    return "\n".join(
        [
            f"Machine: {r['machine']}. Seconds; the second process reads the first one's cache.",
            "",
            "| | first process | second process |",
            "| --- | ---: | ---: |",
            f"| erase compile (README request) | {p[0]['erase_compile_s']:.1f} "
            f"| {p[1]['erase_compile_s']:.1f} |",
            f"| generate compile (8 images, 20 steps) | {p[0]['generate_compile_s']:.1f} "
            f"| {p[1]['generate_compile_s']:.1f} |",
            f"| README command, end to end | {c[0]['seconds']:.1f} | {c[1]['seconds']:.1f} |",
        ]
    )


if __name__ == "__main__":
    main()
