"""bfloat16 on this CPU, layer by layer: which JAX paths reach the matrix/bf16 units, against torch.

    python benchmarks/bf16.py [--repeats 5] [--batch 2] [--latent 32]

The layers of SD v1.4's UNet at its first level (32x32 latents: 1,024 tokens of 320 channels, batch 2 as
classifier-free guidance runs it), plus a 2048^3 GEMM: a linear layer, GEGLU's projection and gate, the
feed-forward output, self-attention (8 heads of 40), cross-attention to 77 text states, a 3x3 convolution.
Each runs as
- ``f32``: float32 in and out;
- ``bf16``: bfloat16 weights and inputs, bfloat16 results (what a model cast to bfloat16 computes);
- ``bf16>f32``: bfloat16 weights and inputs, float32 accumulation and results
  (``preferred_element_type=jnp.float32``), the form that XLA:CPU hands to oneDNN's bf16 kernels;
and torch (same process, same inputs) in float32 and bfloat16. Then the whole SD v1.4 UNet forward (real
config, torch's random weights copied into JAX) at the same size in float32 and bfloat16, both frameworks.
Times are medians after a warm-up; GFLOP/s from the layer's multiply-adds. Writes
benchmarks/results/bf16.json and prints tables naming the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/ is on sys.path when this runs as a script
from pipeline import _median_time

OUT = Path(__file__).resolve().parent / "results" / "bf16.json"


def _median(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call (compile, first allocation)."""
    fn()
    return _median_time(fn, repeats)


def layers(batch: int, latent: int) -> dict[str, dict]:
    """name -> {"shapes": input shapes, "flops": 2 * multiply-adds}."""
    n, c, heads, text = latent * latent, 320, 8, 77
    d = c // heads
    return {
        "gemm 2048^3": {"shapes": [(2048, 2048), (2048, 2048)], "flops": 2 * 2048**3},
        "linear 320->320": {"shapes": [(batch * n, c), (c, c)], "flops": 2 * batch * n * c * c},
        "geglu 320->2x1280": {"shapes": [(batch * n, c), (c, 8 * c)], "flops": 2 * batch * n * c * 8 * c},
        "ff out 1280->320": {"shapes": [(batch * n, 4 * c), (4 * c, c)], "flops": 2 * batch * n * 4 * c * c},
        "self-attention": {
            "shapes": [(batch, heads, n, d)] * 3,
            "flops": 2 * 2 * batch * heads * n * n * d,
        },
        "cross-attention": {
            "shapes": [(batch, heads, n, d), (batch, heads, text, d), (batch, heads, text, d)],
            "flops": 2 * 2 * batch * heads * n * text * d,
        },
        "conv 3x3 320": {
            "shapes": [(batch, latent, latent, c), (3, 3, c, c)],
            "flops": 2 * batch * n * 9 * c * c,
        },
    }


def jax_fn(name: str, mode: str):
    """The layer as a jitted JAX function of (inputs...) in ``mode`` (f32, bf16, bf16>f32)."""
    import jax
    import jax.numpy as jnp

    acc = jnp.float32 if mode == "bf16>f32" else None

    def dot(a, b):
        return jnp.matmul(a, b, preferred_element_type=acc)

    if name.startswith(("gemm", "linear", "ff out")):
        f = dot
    elif name.startswith("geglu"):

        def f(x, w):
            h, gate = jnp.split(dot(x, w), 2, axis=-1)
            return h * jax.nn.gelu(gate, approximate=False)
    elif name.endswith("attention"):

        def f(q, k, v):
            s = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=acc) * q.shape[-1] ** -0.5
            p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
            return jnp.einsum("bhnm,bhmd->bhnd", p, v, preferred_element_type=acc)
    else:

        def f(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=acc
            )

    return jax.jit(f)


def torch_fn(name: str):
    import torch
    import torch.nn.functional as F

    if name.startswith(("gemm", "linear", "ff out")):
        return torch.matmul
    if name.startswith("geglu"):

        def f(x, w):
            h, gate = (x @ w).chunk(2, dim=-1)
            return h * F.gelu(gate)

        return f
    if name.endswith("attention"):
        return F.scaled_dot_product_attention
    return lambda x, w: F.conv2d(x, w, padding=1)


def run(repeats: int, batch: int, latent: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    rows = []
    for name, spec in layers(batch, latent).items():
        arrays = [rng.standard_normal(s).astype(np.float32) for s in spec["shapes"]]
        row = {"layer": name, "gflop": spec["flops"] / 1e9}
        for mode in ("f32", "bf16", "bf16>f32"):
            dtype = jnp.float32 if mode == "f32" else jnp.bfloat16
            xs = [jnp.asarray(a, dtype) for a in arrays]
            f = jax_fn(name, mode)
            row[f"jax {mode}"] = _median(lambda f=f, xs=xs: jax.block_until_ready(f(*xs)), repeats)
        if name.startswith("conv"):  # torch: NCHW input, OIHW weight
            arrays = [arrays[0].transpose(0, 3, 1, 2), arrays[1].transpose(3, 2, 0, 1)]
        f = torch_fn(name)
        for tdtype, label in ((torch.float32, "torch f32"), (torch.bfloat16, "torch bf16")):
            ts = [torch.from_numpy(np.ascontiguousarray(a)).to(tdtype) for a in arrays]
            with torch.inference_mode():
                row[label] = _median(lambda f=f, ts=ts: f(*ts), repeats)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def unet(repeats: int, batch: int, latent: int) -> dict:
    """SD v1.4's UNet forward, one denoising call of a guided batch, in float32 and bfloat16."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.weights import abstract_model, load_state_dict

    folder = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd-v1-4" / "unet"
    torch.manual_seed(0)
    reference = TorchUNet.from_config(TorchUNet.load_config(folder)).eval()
    weights = {k: v.numpy() for k, v in reference.state_dict().items()}
    config = UNet2DConditionConfig.from_json(folder / "config.json")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
    text = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    row: dict = {"latent": latent, "batch": batch}
    for label, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        model = load_state_dict(abstract_model(UNet2DConditionModel, config), weights, dtype=dtype)
        f = jax.jit(lambda m, x, c: m(x, 500.0, c))
        x, c = jnp.asarray(sample, dtype), jnp.asarray(text, dtype)
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(model, x, c))
        row[f"jax {label} compile+first"] = time.perf_counter() - t0
        row[f"jax {label} out dtype"] = str(out.dtype)
        row[f"jax {label}"] = _median(
            lambda f=f, m=model, x=x, c=c: jax.block_until_ready(f(m, x, c)), repeats
        )
        del model
    for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        net = reference.to(dtype)
        x = torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()).to(dtype)
        c = torch.from_numpy(text).to(dtype)
        with torch.inference_mode():
            row[f"torch {label}"] = _median(lambda n=net, x=x, c=c: n(x, 500, c), repeats)
    for label in ("f32", "bf16"):
        row[f"jax/torch {label}"] = row[f"torch {label}"] / row[f"jax {label}"]
    print(
        f"| UNet forward | {row['jax f32']:.3f} | {row['jax bf16']:.3f} | {row['torch f32']:.3f} | "
        f"{row['torch bf16']:.3f} | {row['jax/torch f32']:.2f}x | {row['jax/torch bf16']:.2f}x |",
        flush=True,
    )
    return row


COLUMNS = ("jax f32", "jax bf16", "jax bf16>f32", "torch f32", "torch bf16")


def _line(row: dict) -> str:
    rates = " | ".join(f"{row['gflop'] / row[c]:7.0f}" for c in COLUMNS)
    best_jax_bf16 = min(row["jax bf16"], row["jax bf16>f32"])
    return f"| {row['layer']} | {rates} | {row['torch bf16'] / best_jax_bf16:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    args = parser.parse_args()
    where = machine()
    print(
        f"{where}\n| layer | "
        + " | ".join(f"{c} GFLOP/s" for c in COLUMNS)
        + " | best JAX bf16 / torch bf16 |"
    )
    print("|---" * (len(COLUMNS) + 2) + "|")
    rows = run(args.repeats, args.batch, args.latent)
    print(
        "\n| model | JAX f32 (s) | JAX bf16 (s) | torch f32 (s) | torch bf16 (s) | JAX/torch f32"
        " | JAX/torch bf16 |"
    )
    print("|---" * 7 + "|")
    whole = unet(args.repeats, args.batch, args.latent)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {"machine": where, "batch": args.batch, "latent": args.latent, "rows": rows, "unet": whole},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
