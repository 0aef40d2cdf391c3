"""Attention blocks of the SD UNet and VAE (diffusers ``attention_processor.py``, ``attention.py``,
``transformer_2d.py``): multi-head attention, GEGLU feed-forward, the transformer block and its 2D wrapper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jax_erasepro.models.resnet import conv, group_norm

# Attention runs in blocks of about this many weights (4 MB in float32): a block's scores, weights and, in
# training, their gradients stay in the CPU's cache between the products and the softmax. Materialising all
# (B, heads, N, M) weights at once and differentiating through them was bandwidth-bound: 2.3x slower
# gradients at 16x16 (256 tokens, batch 64, benchmarked against torch's SDPA in session 22).
BLOCK_WEIGHTS = 1 << 20
QUERY_CHUNK = 128  # queries per block when one head's whole (N, M) weights exceed BLOCK_WEIGHTS


def block_shape(slices: int, n: int, m: int) -> tuple[int, int]:
    """(head slices, queries) per block of ``slices`` (batch x heads) attention problems of N queries over M
    keys: all N queries where one slice's weights fit ``BLOCK_WEIGHTS``, else ``QUERY_CHUNK``; then as many
    slices as fit (a divisor of ``slices``). Off the CPU, one block: accelerators want it all at once."""
    if jax.default_backend() != "cpu":
        return slices, n
    rows = n if n * m <= BLOCK_WEIGHTS else QUERY_CHUNK
    fit = max(1, BLOCK_WEIGHTS // (rows * m))
    return max(g for g in range(1, min(fit, slices) + 1) if slices % g == 0), rows


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, causal: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over ``heads`` heads: (B, N, H*d), (B, M, H*d) -> (B, N, H*d), in float32.
    ``causal``: query i sees keys 0..i only (CLIP's text tower).

    Exact softmax in blocks (``block_shape``), with a flash-attention style gradient (``_attention``).
    Heads join the batch and keys are transposed once, so every product is a plain batched matmul, and the
    softmax's division is applied to the (N, d) output rather than the (N, M) weights.
    """
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    q = (q * d**-0.5).reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)
    kt = k.reshape(b, m, heads, d).transpose(0, 2, 3, 1).reshape(b * heads, d, m)
    v = v.reshape(b, m, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, m, d)
    out = _attention(q, kt, v, causal)
    return out.reshape(b, heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, c)


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _scores(q: jax.Array, kt: jax.Array, start: jax.Array, causal: bool) -> jax.Array:
    """q k^T of one block, keys after each query masked to -inf when ``causal``."""
    s = q @ kt
    if causal:
        rows = start + jnp.arange(q.shape[-2])[:, None]
        s = jnp.where(rows >= jnp.arange(kt.shape[-1]), s, -jnp.inf)
    return s


def _map(f, xs):  # noqa: ANN001, ANN202
    """``lax.map`` that calls ``f`` directly on a single item (no loop)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(f, xs)


def _split(x: jax.Array, g: int, rows: int) -> jax.Array:
    """A query-shaped (S, N, ...) array as blocks (S/g, chunks, g, rows, ...), zero-padded to whole chunks."""
    s, n = x.shape[:2]
    chunks = -(-n // rows)
    x = jnp.pad(x, [(0, 0), (0, chunks * rows - n)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(s // g, g, chunks, rows, *x.shape[2:]), 1, 2)


def _unsplit(x: jax.Array, n: int) -> jax.Array:
    """Inverse of ``_split``: (S/g, chunks, g, rows, ...) -> (S, N, ...)."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(x.shape[0] * x.shape[1], -1, *x.shape[4:])[:, :n]


def _starts(qb: jax.Array) -> jax.Array:
    """The first query index of each chunk of blocked queries (S/g, chunks, g, rows, d)."""
    return jnp.arange(qb.shape[1]) * qb.shape[3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, kt: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """(S, N, d) scaled queries, (S, d, M) keys, (S, M, d) values -> (S, N, d), block by block."""
    return _attention_fwd(q, kt, v, causal)[0]


def _attention_fwd(q: jax.Array, kt: jax.Array, v: jax.Array, causal: bool):  # noqa: ANN202
    """The output, and the blocked inputs, output and log-sum-exp that the gradient reuses as they are."""
    s, n = q.shape[:2]
    g, rows = block_shape(s, n, kt.shape[-1])
    qb, ktb, vb = _split(q, g, rows), kt.reshape(s // g, g, *kt.shape[1:]), v.reshape(s // g, g, *v.shape[1:])

    def group(a):  # noqa: ANN001, ANN202
        qg, ktg, vg = a

        def chunk(c):  # noqa: ANN001, ANN202
            s = _scores(c[0], ktg, c[1], causal)
            top = s.max(-1, keepdims=True)
            e = jnp.exp(s - top)
            total = e.sum(-1, keepdims=True)
            return (e @ vg) / total, top + jnp.log(total)

        return _map(chunk, (qg, _starts(qb)))

    outb, lseb = _map(group, (qb, ktb, vb))
    return _unsplit(outb, n), (qb, ktb, vb, outb, lseb)


def _attention_bwd(causal: bool, res, dout: jax.Array):  # noqa: ANN001, ANN202
    """The softmax gradient from recomputed weights P = exp(s - logsumexp): dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK^T = Q^T dS; key gradients summed over query chunks."""
    qb, ktb, vb, outb, lseb = res
    db = _split(dout, qb.shape[2], qb.shape[3])
    deltab = jnp.sum(db * outb, -1, keepdims=True)

    def group(a):  # noqa: ANN001, ANN202
        qg, lg, dg, delg, ktg, vg = a

        def chunk(carry, c):  # noqa: ANN001, ANN202
            dkt, dv = carry
            qc, lc, dc, delc, start = c
            p = jnp.exp(_scores(qc, ktg, start, causal) - lc)
            ds = p * (dc @ _swap(vg) - delc)
            return (dkt + _swap(qc) @ ds, dv + _swap(p) @ dc), ds @ _swap(ktg)

        zeros = (jnp.zeros_like(ktg), jnp.zeros_like(vg))
        (dkt, dv), dq = jax.lax.scan(chunk, zeros, (qg, lg, dg, delg, _starts(qb)))
        return dq, dkt, dv

    dq, dkt, dv = _map(group, (qb, lseb, db, deltab, ktb, vb))
    # key and value gradients: (S/g, g, ...) -> (S, ...)
    return _unsplit(dq, dout.shape[1]), dkt.reshape(-1, *dkt.shape[2:]), dv.reshape(-1, *dv.shape[2:])


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nnx.Module):
    """diffusers ``Attention``: ``to_q``/``to_k``/``to_v`` projections, attention, ``to_out.0``."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, rngs=rngs)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, rngs=rngs)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: ``group_norm``, one head over all channels, residual; NHWC in and out."""

    def __init__(self, channels: int, *, groups: int, eps: float, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, rngs=rngs)
        self.group_norm = group_norm(channels, groups, eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return x + super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class GEGLU(nnx.Module):
    """``proj`` to twice the width, then ``value * gelu(gate)`` (exact erf GELU, as torch's default)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Two products on the kernel's halves rather than one split afterwards: the split copies both halves
        # out of the product (1.1-2.5x slower feed-forward on the CPU).
        kernel, bias = self.proj.kernel[...], self.proj.bias[...]
        half = kernel.shape[-1] // 2
        value = x @ kernel[:, :half] + bias[:half]
        return value * jax.nn.gelu(x @ kernel[:, half:] + bias[half:], approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU, Dropout, Linear]``, 4x inner width; the rate-0 dropout keeps index 1 as in torch."""

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs):
        self.net = nnx.List(
            [GEGLU(dim, mult * dim, rngs=rngs), nnx.Dropout(0.0), nnx.Linear(mult * dim, dim, rngs=rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text states, and GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, rngs=rngs
        )
        self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.ff = FeedForward(dim, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, ``proj_in`` (1x1 conv or linear), transformer blocks on H*W tokens, ``proj_out``, add."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        use_linear_projection: bool,
        num_layers: int = 1,
        rngs: nnx.Rngs,
    ):
        dim_head = channels // heads
        inner = heads * dim_head
        self.norm = group_norm(channels, groups, 1e-6, rngs=rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(channels, inner, rngs=rngs)
            self.proj_out = nnx.Linear(inner, channels, rngs=rngs)
        else:
            self.proj_in = conv(channels, inner, 1, pad=0, rngs=rngs)
            self.proj_out = conv(inner, channels, 1, pad=0, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, rngs=rngs
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # A 1x1 conv and a linear layer act alike on NHWC, so both projections apply to (B, H, W, C).
        b, h, w, _ = x.shape
        hidden = self.proj_in(self.norm(x))
        tokens = hidden.reshape(b, h * w, hidden.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, -1))
