"""SD v1.4 (real configs, random weights) at 32x32 latents: JAX vs diffusers PyTorch, side by side.

    python benchmarks/pipeline.py [--steps 20] [--repeats 3]

Each framework runs in its own subprocess (so peak RSS is its own); the parent prints one table and writes
benchmarks/results/pipeline.json. Times are medians of ``--repeats`` runs after warm-up; JAX compile time
(lower + compile) is reported separately from run time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD14 = ROOT / "tests" / "data" / "sd-v1-4"
BATCH, LATENT = 2, 32


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_jax(steps: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_erasepro import schedulers
    from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
    from jax_erasepro.pipeline import SDConfig, StableDiffusion, _sample
    from jax_erasepro.tokenizer import load_tokenizer

    rngs = nnx.Rngs(0)
    text_cfg = CLIPTextConfig.from_json(SD14 / "text_encoder" / "config.json")
    unet_cfg = UNet2DConditionConfig.from_json(SD14 / "unet" / "config.json")
    vae_cfg = AutoencoderKLConfig.from_json(SD14 / "vae" / "config.json")
    sd = StableDiffusion(
        text_encoder=CLIPTextModel(text_cfg, rngs=rngs),
        unet=UNet2DConditionModel(unet_cfg, rngs=rngs),
        vae=AutoencoderKL(vae_cfg, rngs=rngs),
        tokenizer=load_tokenizer(SD14 / "tokenizer"),
        scheduler_config=schedulers.SchedulerConfig.from_json(SD14 / "scheduler" / "scheduler_config.json"),
        config=SDConfig(text_encoder=text_cfg, unet=unet_cfg, vae=vae_cfg, model_index={}),
    )
    out: dict[str, float] = {}

    def bench(name, fn, *args):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        jax.block_until_ready(compiled(*args))
        out[f"{name}_s"] = _median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)

    te_def, te_params = nnx.split(sd.text_encoder)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49408, (BATCH, 77)), jnp.int32)
    bench("text_encoder", lambda p, x: nnx.merge(te_def, p)(x), te_params, ids)

    unet_def, unet_params = nnx.split(sd.unet)
    x = jnp.ones((BATCH, LATENT, LATENT, 4), jnp.float32)
    ctx = jnp.ones((BATCH, 77, 768), jnp.float32)
    bench("unet_step", lambda p, x, c: nnx.merge(unet_def, p)(x, jnp.int32(500), c), unet_params, x, ctx)

    vae_def, vae_params = nnx.split(sd.vae)
    bench("vae_decode", lambda p, z: nnx.merge(vae_def, p).decode(z), vae_params, x)

    # 20-step generation: one prompt with classifier-free guidance (UNet batch 2), PNDM.
    schedule = schedulers.make_schedule(sd.scheduler_config, "pndm", steps)
    args = (unet_def, vae_def, unet_params, vae_params, schedule, x[:1], True, ctx, jnp.float32(7.5),
            jax.random.key(0), jnp.float32(0.18215))
    t0 = time.perf_counter()
    compiled = _sample.lower(*args).compile()
    out["generate_compile_s"] = time.perf_counter() - t0
    dyn = (unet_params, vae_params, schedule, x[:1], ctx, jnp.float32(7.5), jax.random.key(0),
           jnp.float32(0.18215))
    jax.block_until_ready(compiled(*dyn))
    out["generate_s"] = _median_time(lambda: jax.block_until_ready(compiled(*dyn)), max(1, repeats - 2))
    return out


def run_torch(steps: int, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD14 / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD14 / "unet")).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD14 / "vae")).eval()
    out: dict[str, float] = {}

    def bench(name, fn):
        with torch.inference_mode():
            fn()
            out[f"{name}_s"] = _median_time(fn, repeats)

    ids = torch.randint(0, 49408, (BATCH, 77))
    bench("text_encoder", lambda: text(ids))
    x = torch.ones(BATCH, 4, LATENT, LATENT)
    ctx = torch.ones(BATCH, 77, 768)
    bench("unet_step", lambda: unet(x, 500, ctx))
    bench("vae_decode", lambda: vae.decode(x))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(SD14 / "tokenizer"), unet=unet,
        scheduler=PNDMScheduler.from_pretrained(SD14 / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = LATENT * 8
    out["generate_s"] = _median_time(
        lambda: pipe("a photo", num_inference_steps=steps, height=size, width=size, output_type="np"),
        max(1, repeats - 2),
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        res = (run_jax if args.only == "jax" else run_torch)(args.steps, args.repeats)
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(res))
        return
    results = {}
    for fw in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--only", fw, "--steps", str(args.steps),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = ["text_encoder", "unet_step", "vae_decode", "generate"]
    print(f"SD v1.4 config, random weights, batch {BATCH}, {LATENT}x{LATENT} latents, {args.steps}-step PNDM")
    print(f"{'':14} {'jax s':>9} {'torch s':>9} {'speedup':>8} {'jax compile s':>14}")
    for r in rows:
        j, t = results["jax"][f"{r}_s"], results["torch"][f"{r}_s"]
        print(f"{r:14} {j:9.3f} {t:9.3f} {t / j:7.2f}x {results['jax'][f'{r}_compile_s']:14.1f}")
    print(f"{'peak RSS GB':14} {results['jax']['peak_rss_gb']:9.2f} {results['torch']['peak_rss_gb']:9.2f}")
    out = ROOT / "benchmarks" / "results" / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"batch": BATCH, "latent": LATENT, "steps": args.steps}, **results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
