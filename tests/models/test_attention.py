"""Query-chunked multi-head attention against torch's scaled_dot_product_attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jax_erasepro.models.attention import QUERY_CHUNK, multi_head_attention
from tests.conftest import assert_close


@pytest.mark.parametrize(
    "n, m", [(QUERY_CHUNK, 77), (3 * QUERY_CHUNK, 3 * QUERY_CHUNK), (2 * QUERY_CHUNK + 5, 13)]
)
def test_matches_torch_sdpa(n, m):
    rng = np.random.RandomState(0)
    heads, d = 4, 8
    q = rng.randn(2, n, heads * d).astype(np.float32)
    k, v = (rng.randn(2, m, heads * d).astype(np.float32) for _ in range(2))

    def split(a):
        return torch.from_numpy(a).reshape(2, -1, heads, d).transpose(1, 2)

    ref = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, n, -1)
    assert_close(multi_head_attention(q, k, v, heads), ref.numpy())
