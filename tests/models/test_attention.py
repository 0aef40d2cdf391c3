"""Blocked multi-head attention and its gradient against torch's scaled_dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jax_erasepro.models import attention
from jax_erasepro.models.attention import QUERY_CHUNK, block_shape, multi_head_attention
from tests.conftest import assert_close

HEADS, D = 4, 8
# (queries, keys, causal, BLOCK_WEIGHTS): one block; several head slices per block; query chunks with a
# padded last chunk; causal chunks (each chunk's mask starts at its own first query).
CASES = [
    (QUERY_CHUNK, 77, False, None),
    (77, 77, True, None),
    (3 * QUERY_CHUNK, 3 * QUERY_CHUNK, False, None),
    (2 * QUERY_CHUNK + 5, 13, False, 2 * QUERY_CHUNK * 13),
    (2 * QUERY_CHUNK + 5, 2 * QUERY_CHUNK + 5, True, 1000),
]


def _inputs(n: int, m: int) -> tuple[np.ndarray, ...]:
    rng = np.random.RandomState(n + m)
    q = rng.randn(2, n, HEADS * D).astype(np.float32)
    k, v = (rng.randn(2, m, HEADS * D).astype(np.float32) for _ in range(2))
    return q, k, v, rng.randn(2, n, HEADS * D).astype(np.float32)


def _torch(q, k, v, causal):  # noqa: ANN001, ANN202
    def split(a):  # noqa: ANN001, ANN202
        return a.reshape(2, -1, HEADS, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return out.transpose(1, 2).reshape(2, q.shape[1], -1)


@pytest.mark.parametrize("n, m, causal, block", CASES)
def test_matches_torch_sdpa(n, m, causal, block, monkeypatch):
    if block:
        monkeypatch.setattr(attention, "BLOCK_WEIGHTS", block)
    q, k, v, _ = _inputs(n, m)
    ref = _torch(*(torch.from_numpy(a) for a in (q, k, v)), causal)
    assert_close(multi_head_attention(q, k, v, HEADS, causal=causal), ref.numpy())


@pytest.mark.parametrize("n, m, causal, block", CASES)
def test_gradient_matches_torch(n, m, causal, block, monkeypatch):
    """The custom (recomputing, blocked) gradient against torch autograd, for q, k and v."""
    if block:
        monkeypatch.setattr(attention, "BLOCK_WEIGHTS", block)
    q, k, v, w = _inputs(n, m)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    (_torch(tq, tk, tv, causal) * torch.from_numpy(w)).sum().backward()

    def loss(q, k, v):  # noqa: ANN001, ANN202
        return jnp.sum(w * multi_head_attention(q, k, v, HEADS, causal=causal))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for got, ref in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        assert_close(got, ref.numpy())


@pytest.mark.parametrize(
    "slices, n, m", [(256, 256, 256), (512, 77, 77), (16, 4096, 4096), (6, 100, 7), (7, 3, 3)]
)
def test_block_shape(slices, n, m):
    """A block is whole head slices (a divisor) of all queries or QUERY_CHUNK, within BLOCK_WEIGHTS."""
    g, rows = block_shape(slices, n, m)
    assert slices % g == 0
    assert rows == (n if n * m <= attention.BLOCK_WEIGHTS else QUERY_CHUNK)
    assert g == 1 or g * rows * m <= attention.BLOCK_WEIGHTS
