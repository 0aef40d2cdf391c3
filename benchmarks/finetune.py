"""Fine-tuning erasure methods: one optimisation step, JAX against PyTorch, side by side in one run.

    python benchmarks/finetune.py [--models shapes-sd sd14] [--methods esd-x ac allbutone] [--repeats 3]

One step is what each method does per iteration once x_t is drawn: the frozen predictions, the trained
U-Net's forward and backward over the trainable set, and the optimiser update; ESD-x (attn2, batch 1,
Adam), AC (attn2 to_k/to_v, batch 4, model-based, clipped AdamW) and All but One (attn2, batch 1, Adam;
the penalty and the bottleneck). The partial sampling that draws x_t (ESD, All but One) is a run of guided
U-Net forwards, which benchmarks/pipeline.py measures; it is left out of both sides. shapes-sd at its own
16x16 latents with its weights; SD v1.4's configs at 32x32 latents with random weights (speed does not
depend on them). torch runs diffusers' U-Net with the same config, float32, 2 threads. Each framework runs
in its own subprocess; medians of ``--repeats`` steps after one warm-up, JAX's compile apart; peak memory is
the process's max RSS. Writes benchmarks/results/finetune.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import machine as describe_machine

ROOT = Path(__file__).resolve().parent.parent
SD14 = ROOT / "tests" / "data" / "sd-v1-4"
RESULTS = ROOT / "benchmarks" / "results" / "finetune.json"
BATCH = {"esd-x": 1, "ac": 4, "allbutone": 1}
LATENT = {"shapes-sd": None, "sd14": 32}


def _folder(model: str) -> Path:
    from jax_erasepro.default_model import default_model_path

    return default_model_path() if model == "shapes-sd" else SD14


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_jax(model: str, method: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_erasepro.erase import ac, allbutone, esd, finetune
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    folder = _folder(model)
    cfg = UNet2DConditionConfig.from_json(folder / "unet" / "config.json")
    if model == "shapes-sd":
        import jax_erasepro as jep

        sd = jep.load_pretrained(folder)
    else:
        from types import SimpleNamespace

        sd = SimpleNamespace(unet=UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    side = LATENT[model] or cfg.sample_size
    b, d = BATCH[method], cfg.cross_attention_dim
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.normal(size=(b, side, side, cfg.in_channels)), jnp.float32)
    t = jnp.full((b,), 500)
    c, a, u = (jnp.asarray(rng.normal(size=(b, 77, d)), jnp.float32) for _ in range(3))
    parts = {"esd-x": ("attn2.",), "ac": ("attn2.to_k.", "attn2.to_v."), "allbutone": ("attn2.",)}[method]
    keep = lambda path, _: any(p in ".".join(map(str, path)) + "." for p in parts)  # noqa: E731
    unet_def, trainable, rest = nnx.split(sd.unet, nnx.All(nnx.Param, keep), ...)
    original = trainable
    tx = finetune.optimizer(max_grad_norm=1.0 if method == "ac" else None)
    opt_state = tx.init(trainable)
    lr = jnp.float32(1e-5)

    def step(trainable, opt_state, original, rest, x_t, t, c, a, u):
        if method == "esd-x":
            goal = esd.frozen_target(unet_def, original, rest, x_t, t, c, u, 2.0, "target")
            loss, g = jax.value_and_grad(esd.esd_loss, argnums=1)(unet_def, trainable, rest, x_t, t, c, goal)
            wd = 0.0
        elif method == "ac":
            goal = ac.anchor_goal(unet_def, trainable, rest, x_t, t, a)
            loss, g = jax.value_and_grad(ac.ac_loss, argnums=1)(unet_def, trainable, rest, x_t, t, c, goal)
            wd = 1e-2
        else:
            frozen = allbutone.frozen_predictions(unet_def, original, rest, x_t, t, c, a, u)
            (loss, _), g = jax.value_and_grad(allbutone.allbutone_loss, argnums=1, has_aux=True)(
                unet_def, trainable, rest, x_t, t, c, u, frozen, jnp.float32(1.0), 0.1, jnp.float32(1e-4)
            )
            wd = 0.0
        new, opt_state = finetune.apply(tx, trainable, g, opt_state, lr, wd)
        return new, opt_state, loss

    args = (trainable, opt_state, original, rest, x_t, t, c, a, u)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    step_s = _median(lambda: jax.block_until_ready(compiled(*args)), repeats)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return {"jax_step_s": step_s, "jax_compile_s": compile_s, "jax_peak_gb": _peak_gb(), "trainable": n}


def run_torch(model: str, method: str, repeats: int) -> dict:
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    folder = _folder(model)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    frozen = copy.deepcopy(unet).requires_grad_(False)
    cfg = unet.config
    side = LATENT[model] or cfg.sample_size
    b, d = BATCH[method], cfg.cross_attention_dim
    x_t = torch.randn(b, cfg.in_channels, side, side)
    t = torch.full((b,), 500)
    c, a, u = (torch.randn(b, 77, d) for _ in range(3))
    parts = {"esd-x": ("attn2.",), "ac": ("attn2.to_k", "attn2.to_v"), "allbutone": ("attn2.",)}[method]
    params = []
    for name, p in unet.named_parameters():
        p.requires_grad_(any(s in name for s in parts))
        if p.requires_grad:
            params.append(p)
    if method == "ac":
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    else:
        opt = torch.optim.Adam(params, lr=1e-5)
    mse = torch.nn.functional.mse_loss

    def step():
        opt.zero_grad()
        if method == "esd-x":  # esd_sd.py
            with torch.no_grad():
                e_c, e_u = frozen(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, u])).sample.chunk(2)
            loss = mse(unet(x_t, t, c).sample, e_c - 2.0 * (e_c - e_u))
        elif method == "ac":  # train.py, model-based
            with torch.no_grad():
                goal = unet(x_t, t, a).sample
            loss = mse(unet(x_t, t, c).sample, goal)
        else:
            with torch.no_grad():
                e_c0, e_a0, e_u0 = frozen(
                    torch.cat([x_t] * 3), torch.cat([t] * 3), torch.cat([c, a, u])
                ).sample.chunk(3)
            e_c, e_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, u])).sample.chunk(2)
            g0 = (e_c0 - e_u0).flatten(1)
            lo, hi = torch.quantile(g0, 0.1, 1, True), torch.quantile(g0, 0.9, 1, True)
            mask = ((g0 <= lo) | (g0 >= hi)).float().reshape(e_c.shape)
            erase = (mask * ((e_c - e_u) - (e_a0 - e_u0)) ** 2).sum() / mask.sum()
            loss = erase + 1.0 * (mse(e_u, e_u0) - 1e-4)
        loss.backward()
        if method == "ac":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    return {"torch_step_s": _median(step, repeats), "torch_peak_gb": _peak_gb()}


def _child(framework: str, model: str, method: str, repeats: int) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import finetune; "
        f"print('RESULT' + json.dumps(finetune.run_{framework}({model!r}, {method!r}, {repeats})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} {model} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shapes-sd", "sd14"], choices=list(LATENT))
    parser.add_argument("--methods", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for method in args.methods:
            row = {"model": model, "method": method, "batch": BATCH[method], "latent": LATENT[model]}
            row.update(_child("jax", model, method, args.repeats))
            row.update(_child("torch", model, method, args.repeats))
            row["jax_speedup"] = row["torch_step_s"] / row["jax_step_s"]
            rows.append(row)
            print(
                f"{model:9s} {method:9s} JAX {row['jax_step_s']:.3f} s "
                f"(compile {row['jax_compile_s']:.1f} s, "
                f"peak {row['jax_peak_gb']:.1f} GB)  torch {row['torch_step_s']:.3f} s "
                f"(peak {row['torch_peak_gb']:.1f} GB)  JAX/torch speed {row['jax_speedup']:.2f}x",
                flush=True,
            )
    machine = {"cpu": describe_machine(), "python": platform.python_version()}
    out = {"machine": machine, "repeats": args.repeats, "rows": rows}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
