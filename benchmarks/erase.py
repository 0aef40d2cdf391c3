"""ErasePro on SD v1.4's configs (random weights): JAX ``erase`` against a plain PyTorch implementation.

Run: ``python benchmarks/erase.py [--sizes 1 10 100 500]``; writes benchmarks/results/erase.json and prints
a table. Times after compile come from a second call with equal shapes (the compiled program is cached);
the speedup is torch's features + solve over ours, both after compile. The text encoder and the U-Net's
attn2 to_k/to_v are random; the rest of the U-Net and the VAE are abstract (``nnx.eval_shape``): an erasure
never reads them, and this keeps the run under ~3 GB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from jax_erasepro import erase
from jax_erasepro.erase.columns import build_columns
from jax_erasepro.erase.layers import unet_cross_attention
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.pipeline import SDConfig, StableDiffusion
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.tiny import SD_SCHEDULER, clip_tokenizer_path
from jax_erasepro.tokenizer import load_tokenizer
from jax_erasepro.weights import iter_state_dict, to_state_dict

CONFIGS = Path(__file__).parents[1] / "jax_erasepro" / "assets" / "sd-v1-4-configs"
WORDS_A = ["red", "blue", "old", "tiny", "wild", "green", "dark", "calm", "bold", "pale"]
WORDS_B = [
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "bird",
    "ship",
    "lamp",
    "road",
    "moon",
    "fish",
    "cake",
    "rock",
    "coat",
    "door",
    "lake",
    "fire",
    "rain",
    "king",
    "bell",
    "star",
    "wolf",
    "bear",
    "rose",
    "sand",
    "snow",
    "wind",
    "leaf",
    "bone",
    "gold",
    "iron",
    "milk",
    "salt",
    "silk",
    "wood",
    "glass",
    "stone",
    "cloud",
    "river",
    "field",
    "horse",
    "tiger",
    "eagle",
    "apple",
    "bread",
    "chair",
    "clock",
    "crown",
    "drum",
    "flag",
]


def concepts(n: int) -> list[str]:
    return [f"{a} {b}" for a in WORDS_A for b in WORDS_B][:n]


def build_sd(seed: int = 0) -> StableDiffusion:
    """SD v1.4 configs; random text encoder and attn2 k/v kernels; every other U-Net/VAE param abstract."""
    text = CLIPTextConfig.from_dict(json.loads((CONFIGS / "text_encoder" / "config.json").read_text()))
    unet_cfg = UNet2DConditionConfig.from_dict(json.loads((CONFIGS / "unet" / "config.json").read_text()))
    vae_cfg = AutoencoderKLConfig.from_dict(json.loads((CONFIGS / "vae" / "config.json").read_text()))
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(unet)
    flat = dict(nnx.to_flat_state(state))
    key = jax.random.key(seed)
    for path, var in list(flat.items()):
        if tuple(map(str, path[-3:])) in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel")):
            key, sub = jax.random.split(key)
            flat[path] = var.replace(jax.random.normal(sub, var.shape) / np.sqrt(var.shape[0]))
    return StableDiffusion(
        text_encoder=CLIPTextModel(text, rngs=nnx.Rngs(seed)),
        unet=nnx.merge(graphdef, nnx.from_flat_state(flat)),
        vae=nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))),
        tokenizer=load_tokenizer(clip_tokenizer_path()),
        scheduler_config=SchedulerConfig.from_dict(SD_SCHEDULER),
        config=SDConfig(text_encoder=text, unet=unet_cfg, vae=vae_cfg, model_index={}),
    )


@torch.no_grad()
def torch_erasepro(model: TorchCLIP, kv: list[torch.Tensor], cols) -> tuple[float, float, list[torch.Tensor]]:
    """The same progressive algorithm, plainly: W = W_o + W_o (Y - X) X^+ per layer (torch.linalg.pinv)."""
    t0 = time.perf_counter()
    tm = model
    x_ids, y_ids = torch.from_numpy(cols.x_ids).long(), torch.from_numpy(cols.y_ids).long()
    xr, xp, yr, yp = (torch.from_numpy(getattr(cols, k)).long() for k in ("x_row", "x_pos", "y_row", "y_pos"))
    mask = torch.full((77, 77), float("-inf")).triu(1)[None, None]
    hy = tm(y_ids, output_hidden_states=True)
    t_features = time.perf_counter()
    h = tm.embeddings(input_ids=x_ids)
    for i, layer in enumerate(tm.encoder.layers):
        fx = layer.layer_norm1(h)[xr, xp].T
        fy = layer.layer_norm1(hy.hidden_states[i])[yr, yp].T
        pinv = torch.linalg.pinv(fx)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight
            proj.weight.copy_(w + (w @ (fy - fx)) @ pinv)
        h = layer(h, mask)
    fx = tm.final_layer_norm(h)[xr, xp].T
    fy = hy.last_hidden_state[yr, yp].T
    pinv = torch.linalg.pinv(fx)
    new = [w + (w @ (fy - fx)) @ pinv for w in kv]
    return t_features - t0, time.perf_counter() - t_features, new


def save_edits(sd: StableDiffusion, edited: list[str], path: Path) -> None:
    """The edited tensors (diffusers keys) as one safetensors delta: what an erasure has to write. Only
    those tensors are converted to PyTorch layout."""
    prefix = "text_encoder."
    wanted = {k[len(prefix) :] for k in edited if k.startswith(prefix)}
    state = {prefix + k: v for k, v in iter_state_dict(sd.text_encoder, keys=wanted)}
    state.update(
        {b.keys[i]: np.asarray(k).T for b in unet_cross_attention(sd) for i, k in enumerate(b.kernels)}
    )
    save_file({k: np.ascontiguousarray(state[k]) for k in edited}, str(path))


def run(sizes: list[int], out: Path) -> dict:
    t0 = time.perf_counter()
    sd = build_sd()
    load_s = time.perf_counter() - t0
    state = to_state_dict(sd.text_encoder)
    kv = [torch.from_numpy(np.asarray(k).T.copy()) for b in unet_cross_attention(sd) for k in b.kernels]
    rows = []
    for n in sizes:
        targets = concepts(n)
        _, first = erase(sd, targets, "thing", prompts=["{}"])  # compiles; equal shapes are cached after
        erased, report = erase(sd, targets, "thing", prompts=["{}"])
        t = report.timings
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_edits(erased, report.edited, Path(tmp) / "delta.safetensors")
        save_s = time.perf_counter() - t0
        torch_model = TorchCLIP(TorchCLIPConfig(**sd.config.text_encoder.to_dict()))
        torch_model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
        )
        cols = build_columns(sd.tokenizer, targets, ["thing"] * n, [], ["{}"])
        tf, ts, _ = torch_erasepro(torch_model.eval(), kv, cols)
        jax_run = t["features"] + t["solve"]
        rows.append(
            {
                "concepts": n,
                "columns": report.columns["total"],
                "compile_s": first.timings["compile"],
                "recompile_s": t["compile"],
                "prepare_s": t["prepare"],
                "features_s": t["features"],
                "solve_s": t["solve"],
                "save_s": save_s,
                "total_after_compile_s": t["total"] + save_s,
                "first_call_total_s": first.timings["total"],
                "torch_features_s": tf,
                "torch_solve_s": ts,
                "speedup_vs_torch": (tf + ts) / jax_run,
                "max_residual_hard": report.max_residual(),
                "notes": report.notes,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    _, unrolled = erase(sd, concepts(1), "thing", prompts=["{}"], unroll=True)
    compile_cmp = {
        "scan_compile_s": rows[0]["compile_s"],
        "unrolled_compile_s": unrolled.timings["compile"],
        "unrolled_features_plus_solve_s": unrolled.timings["features"] + unrolled.timings["solve"],
        "scan_features_plus_solve_s": rows[0]["features_s"] + rows[0]["solve_s"],
    }
    result = {"device": str(jax.devices()[0]), "load_s": load_s, "rows": rows, "compile": compile_cmp}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    head = ("concepts", "cols", "compile", "prep", "feat", "solve", "save", "total", "torch", "speedup")
    print(" ".join(f"{h:>8}" for h in head))
    for r in rows:
        vals = [r["prepare_s"], r["features_s"], r["solve_s"], r["save_s"], r["total_after_compile_s"]]
        print(
            f"{r['concepts']:>8} {r['columns']:>8} {r['compile_s']:>8.2f} "
            + " ".join(f"{v:>8.2f}" for v in vals)
            + f" {r['torch_features_s'] + r['torch_solve_s']:>8.2f} {r['speedup_vs_torch']:>8.2f}"
        )
    print(f"load {load_s:.2f} s;", compile_cmp)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "erase.json")
    args = parser.parse_args()
    run(args.sizes, args.out)
