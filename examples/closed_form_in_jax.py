"""The erasure as a function of arrays: jit it, vmap it over concepts, differentiate through the solve.

    python examples/closed_form_in_jax.py

On the embedded shapes-sd, for the U-Net's first bucket of cross-attention projections (every attn2
to_k/to_v of one shape, as a stacked (n, d_out, d_in) array):

1. ``jax.vmap`` computes one ErasePro edit (exact: W x = W_o y on the target's columns, preserved columns
   held) and one UCE edit (ridge) per concept in a single compiled call, one concept per batch row;
2. ``jax.grad`` differentiates UCE's closed form with respect to its ridge weight ``lam``: how fast the
   preserved prompts' drift and the target's residual change as the edit is loosened.

The library's ``erase()`` does the same over every layer with the prompt templates, padding and reports;
these solvers (``jax_erasepro.erase.solvers``) are the pure functions underneath.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jax_erasepro as jep
from jax_erasepro.erase.layers import unet_cross_attention
from jax_erasepro.erase.solvers import erasepro_solve, uce_solve


def columns(sd: jep.StableDiffusion, prompts: list[str], n: int) -> jax.Array:
    """(len(prompts), d, n): each prompt's first ``n`` token states (BOS, its tokens, EOS) as columns."""
    return jnp.swapaxes(jep.encode_prompts(sd, prompts)[:, :n], 1, 2)


def relative(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.linalg.norm(a) / jnp.linalg.norm(b)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concepts", nargs="+", default=["zorbly", "quibbet", "heart", "Pavo Lindqvist"])
    parser.add_argument("--anchor", default="a star")
    parser.add_argument("--preserve", nargs="+", default=["a red circle", "a blue square", ""])
    args = parser.parse_args(argv)

    sd = jep.load_pretrained()
    bucket = unet_cross_attention(sd)[0]
    w_o = jnp.swapaxes(bucket.stack(), -1, -2)  # (n, d_out, d_in): the library keeps kernels as (in, out)
    n = 6  # token states per prompt: BOS, up to 4 tokens, EOS
    x = columns(sd, [f"a picture of {c}" for c in args.concepts], n)  # (C, d, n)
    y = columns(sd, [f"a picture of {args.anchor}"], n)[0]  # (d, n): every concept goes to the anchor
    p = columns(sd, args.preserve, n).transpose(1, 0, 2).reshape(x.shape[1], -1)  # (d, P n)

    @jax.jit
    def per_concept(x_c: jax.Array) -> dict[str, jax.Array]:
        w_ep, _ = erasepro_solve(w_o, x_c, y, p)
        w_uce, _ = uce_solve(w_o, x_c, y, p, lam=0.5, preserve_scale=1.0)
        out = {}
        for name, w in (("erasepro", w_ep), ("uce", w_uce)):
            out[f"{name}_target_residual"] = relative(w @ x_c - w_o @ y, w_o @ y)
            out[f"{name}_preserve_drift"] = relative((w - w_o) @ p, w_o @ p)
        return out

    results = jax.vmap(per_concept)(x)  # one edit per concept, all in one call

    def drift(lam: jax.Array, x_c: jax.Array) -> jax.Array:
        w, _ = uce_solve(w_o, x_c, y, p, lam=lam, preserve_scale=1.0)
        return relative((w - w_o) @ p, w_o @ p)

    lam, h = jnp.float32(0.5), jnp.float32(0.05)
    d_drift = jax.jit(jax.vmap(jax.grad(drift), in_axes=(None, 0)))(lam, x)
    at = jax.jit(jax.vmap(drift, in_axes=(None, 0)))
    central = (at(lam + h, x) - at(lam - h, x)) / (2 * h)  # the same derivative by finite differences

    print(f"{len(bucket.keys)} weights of shape {tuple(w_o.shape[1:])}, anchor {args.anchor!r}")
    print(
        f"{'concept':>16} {'ErasePro resid':>14} {'drift':>8} {'UCE resid':>10} {'drift':>8} "
        f"{'d drift/d lam':>14} {'(central diff.)':>15}"
    )
    for i, c in enumerate(args.concepts):
        r = {k: float(v[i]) for k, v in results.items()}
        print(
            f"{c:>16} {r['erasepro_target_residual']:14.2e} {r['erasepro_preserve_drift']:8.4f} "
            f"{r['uce_target_residual']:10.4f} {r['uce_preserve_drift']:8.4f} "
            f"{float(d_drift[i]):14.4f} {float(central[i]):15.4f}"
        )
    return {
        **{k: v.tolist() for k, v in results.items()},
        "d_drift_d_lam": d_drift.tolist(),
        "central_difference": central.tolist(),
    }


if __name__ == "__main__":
    main()
