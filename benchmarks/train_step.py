"""shapes-sd training steps (the recipes' UNet, VAE and CLIP): JAX + optax against torch, side by side.

    python benchmarks/train_step.py [--sizes f4 small] [--models unet vae clip] [--repeats 5] [--allocators]

One step is the loss, its gradients and an AdamW update at the recipes' batch sizes (UNet 64, VAE 32, CLIP
128), random weights and inputs (speed does not depend on them). torch runs diffusers' UNet and VAE and
transformers' CLIPModel with the same configs. JAX runs twice: with XLA's default flags and with
``recipes.shapes_sd.xla_flags.TRAINING_FLAGS``, which train_vae and train_unet set (train_clip does not);
JAX/torch compares the step each recipe runs. ``--allocators`` runs the recipe's JAX step and the torch step
again under jemalloc (``recipes.shapes_sd.allocator``, which the training scripts use when it is installed)
and reports both frameworks under both allocators, with kernel (sys) seconds and page faults per step.
Each run is its own subprocess; times are medians after two warm-up steps, JAX's compile reported apart;
FLOPs are XLA's count for the JAX step. Writes benchmarks/results/train_step.json (rows of other models
kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import _median_time  # benchmarks/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))  # recipes/ is not installed: it imports from the checkout
UNET_BATCH, VAE_BATCH, CLIP_BATCH, TEXT_DIM, TOKENS = 64, 32, 128, 128, 77
BATCH = {"unet": UNET_BATCH, "vae": VAE_BATCH, "clip": CLIP_BATCH}
FLAGGED = {"unet", "vae"}  # the models whose training scripts set TRAINING_FLAGS (train_clip does not)


def _configs(model: str, size: str) -> dict:
    from recipes.shapes_sd.train_clip import clip_config
    from recipes.shapes_sd.train_unet import unet_config
    from recipes.shapes_sd.train_vae import vae_config

    if model == "clip":
        return clip_config("small").to_dict()  # one CLIP size: the recipe's
    return (unet_config(size, TEXT_DIM) if model == "unet" else vae_config(size)).to_dict()


def run_jax(model: str, size: str, repeats: int) -> dict:
    import jax
    import optax
    from flax import nnx

    from jax_erasepro.models.clip import CLIPConfig, CLIPModel
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
    from recipes.shapes_sd.train_clip import contrastive_loss
    from recipes.shapes_sd.train_unet import unet_loss
    from recipes.shapes_sd.train_vae import vae_loss

    cfg = _configs(model, size)
    if model == "unet":
        net = UNet2DConditionModel(UNet2DConditionConfig.from_dict(cfg), rngs=nnx.Rngs(0))
        s = cfg["sample_size"]
        batch = {
            "latents": jax.random.normal(jax.random.key(1), (UNET_BATCH, s, s, 4)),
            "context": jax.random.normal(jax.random.key(2), (UNET_BATCH, TOKENS, TEXT_DIM)),
        }
        loss_fn = unet_loss
    elif model == "clip":
        net = CLIPModel(CLIPConfig.from_dict(cfg), rngs=nnx.Rngs(0))
        for encoder in (net.text_model.encoder, net.vision_model.encoder):  # as train_clip trains it
            encoder.unroll = encoder.layers.layer_norm1.scale.shape[0]
        batch = {
            "input_ids": jax.random.randint(jax.random.key(1), (CLIP_BATCH, TOKENS), 0, 49408),
            "images": jax.random.randint(jax.random.key(2), (CLIP_BATCH, 64, 64, 3), 0, 256),
        }
        loss_fn = contrastive_loss
    else:
        net = AutoencoderKL(AutoencoderKLConfig.from_dict(cfg), rngs=nnx.Rngs(0))
        size_px = cfg["sample_size"]
        batch = {"images": jax.random.randint(jax.random.key(1), (VAE_BATCH, size_px, size_px, 3), 0, 256)}
        loss_fn = vae_loss
    tx = optax.adamw(1e-4)
    graphdef, params = nnx.split(net, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p), batch, key)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state = [params, opt_state]

    def one() -> None:
        state[0], state[1], value = compiled(state[0], state[1], batch, key)
        jax.block_until_ready(value)

    one()
    one()
    gflop = float(cost.get("flops", 0.0)) / 1e9
    return {"jax_compile_s": compile_s, "gflop": gflop} | _timed("jax", one, repeats)


def run_torch(model: str, size: str, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = _configs(model, size)
    if model == "unet":
        net = UNet2DConditionModel.from_config(cfg)
        s = cfg["sample_size"]
        latents = torch.randn(UNET_BATCH, 4, s, s)
        context = torch.randn(UNET_BATCH, TOKENS, TEXT_DIM)

        def loss() -> torch.Tensor:
            t = torch.randint(0, 1000, (UNET_BATCH,))
            noise = torch.randn_like(latents)
            noisy = latents + noise  # the schedule's scaling does not change the cost
            return torch.mean((net(noisy, t, context).sample - noise) ** 2)
    elif model == "clip":
        net = CLIPModel(CLIPConfig(**cfg))
        ids = torch.randint(0, 49408, (CLIP_BATCH, TOKENS))
        images = torch.rand(CLIP_BATCH, 3, 64, 64) * 2 - 1

        def loss() -> torch.Tensor:
            return net(input_ids=ids, pixel_values=images, return_loss=True).loss
    else:
        net = AutoencoderKL.from_config(cfg)
        size_px = cfg["sample_size"]
        x = torch.rand(VAE_BATCH, 3, size_px, size_px) * 2 - 1

        def loss() -> torch.Tensor:
            dist = net.encode(x).latent_dist
            recon = net.decode(dist.sample()).sample
            kl = 0.5 * torch.mean(dist.mean**2 + dist.var - 1.0 - dist.logvar)
            return torch.mean(torch.abs(recon - x)) + torch.mean((recon - x) ** 2) + 1e-6 * kl

    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    one()
    one()
    return {"torch_threads": torch.get_num_threads()} | _timed("torch", one, repeats)


def _timed(prefix: str, one, repeats: int) -> dict:  # noqa: ANN001
    """The median step time over ``repeats`` steps, and the kernel seconds and minor page faults per step
    over the same steps (where fresh pages go)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    step_s = _median_time(one, repeats)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {f"{prefix}_step_s": step_s, f"{prefix}_sys_s": (after.ru_stime - before.ru_stime) / repeats,
            f"{prefix}_page_faults": (after.ru_minflt - before.ru_minflt) / repeats}


def _child(args: list[str], xla_flags: str | None = None, jemalloc: bool = False) -> dict:
    from recipes.shapes_sd.allocator import CHOICE, find_jemalloc, jemalloc_env

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", CHOICE)}  # glibc unless asked
    if jemalloc and (env := jemalloc_env(env, find_jemalloc())) is None:
        raise SystemExit("--allocators: no jemalloc found (apt install libjemalloc2)")
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from recipes.shapes_sd.xla_flags import TRAINING_FLAGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["f4", "small"])
    parser.add_argument("--models", nargs="+", default=["unet", "vae", "clip"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allocators", action="store_true", help="also run JAX and torch under jemalloc")
    parser.add_argument("--child", nargs=4, metavar=("FRAMEWORK", "MODEL", "SIZE", "REPEATS"))
    args = parser.parse_args()
    if args.child:
        framework, model, size, repeats = args.child
        fn = run_jax if framework == "jax" else run_torch
        print(json.dumps(fn(model, size, int(repeats))))
        return
    path = ROOT / "benchmarks" / "results" / "train_step.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    cases = [(m, s) for s in args.sizes for m in ("unet", "vae") if m in args.models]
    cases += [("clip", "small")] if "clip" in args.models else []
    rows = [r for r in rows if (r["model"], r["size"]) not in cases]
    for model, size in cases:
        row = {"model": model, "size": size, "batch": BATCH[model]}
        row |= {f"default_{k}": v for k, v in _child(["jax", model, size, str(args.repeats)], "").items()}
        row |= _child(["jax", model, size, str(args.repeats)], " ".join(TRAINING_FLAGS))
        row |= _child(["torch", model, size, str(args.repeats)])
        row["flags_speedup"] = row["default_jax_step_s"] / row["jax_step_s"]
        row["recipe_uses_flags"] = model in FLAGGED
        row["recipe_jax_step_s"] = row["jax_step_s"] if model in FLAGGED else row["default_jax_step_s"]
        row["jax_speedup"] = row["torch_step_s"] / row["recipe_jax_step_s"]
        row["jax_gflops"] = row["gflop"] / row["recipe_jax_step_s"]
        if args.allocators:
            recipe_flags = " ".join(TRAINING_FLAGS) if model in FLAGGED else ""
            je = _child(["jax", model, size, str(args.repeats)], recipe_flags, jemalloc=True)
            je |= _child(["torch", model, size, str(args.repeats)], jemalloc=True)
            row |= {f"jemalloc_{k}": v for k, v in je.items()}
            row["jemalloc_jax_gain"] = row["recipe_jax_step_s"] / je["jax_step_s"]
            row["jemalloc_torch_gain"] = row["torch_step_s"] / je["torch_step_s"]
            row["jemalloc_jax_speedup"] = je["torch_step_s"] / je["jax_step_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"{'model':6} {'size':6} {'batch':>5} {'GFLOP':>6} {'JAX default s':>13} {'JAX flags s':>11} "
        f"{'torch s':>8} {'flags gain':>10} {'recipe':>7} {'JAX/torch':>9} {'GFLOP/s':>7} {'compile s':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:6} {r['size']:6} {r['batch']:5d} {r['gflop']:6.1f} {r['default_jax_step_s']:13.3f} "
            f"{r['jax_step_s']:11.3f} {r['torch_step_s']:8.3f} {r['flags_speedup']:9.2f}x "
            f"{'flags' if r['recipe_uses_flags'] else 'default':>7} "
            f"{r['jax_speedup']:8.2f}x {r['jax_gflops']:7.0f} {r['jax_compile_s']:9.1f}"
        )
    mem = [r for r in rows if "jemalloc_jax_step_s" in r]
    if mem:
        print(f"\n{'model':6} {'size':6} {'allocator':9} {'JAX s':>6} {'sys s':>6} {'faults':>7} "
              f"{'torch s':>7} {'sys s':>6} {'faults':>7} {'JAX/torch':>9}")
    for r in mem:
        recipe = "" if r["recipe_uses_flags"] else "default_"  # the JAX run the recipe uses, under glibc
        for name, jax, torch in (("glibc", recipe, ""), ("jemalloc", "jemalloc_", "jemalloc_")):
            jax_s, torch_s = r[jax + "jax_step_s"], r[torch + "torch_step_s"]
            print(f"{r['model']:6} {r['size']:6} {name:9} {jax_s:6.3f} {r[jax + 'jax_sys_s']:6.3f} "
                  f"{r[jax + 'jax_page_faults']:7.0f} {torch_s:7.3f} {r[torch + 'torch_sys_s']:6.3f} "
                  f"{r[torch + 'torch_page_faults']:7.0f} {torch_s / jax_s:8.2f}x")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"training_flags": list(TRAINING_FLAGS), "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
