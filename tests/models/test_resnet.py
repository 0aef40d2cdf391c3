"""Conv2d's im2col path for tiny feature maps: the same function (and gradients) as the lax convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_erasepro.models.resnet import IM2COL_MAX_SIDE, conv
from tests.conftest import assert_close


def _lax_conv(c, x):
    out = jax.lax.conv_general_dilated(
        x, c.kernel[...], (1, 1), c.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out + c.bias[...]


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (2, 5), (5, 1), (3, 3)])
@pytest.mark.parametrize("pad", [1, ((0, 1), (1, 0))])
def test_small_maps_match_torch_and_lax(hw, pad):
    c = conv(6, 5, 3, pad=pad, rngs=nnx.Rngs(0))
    if not isinstance(pad, int) and min(hw) < 2:
        pytest.skip("a 3x3 kernel with one row/column of padding has no output on this map")
    x = jax.random.normal(jax.random.key(1), (2, *hw, 6))
    if isinstance(pad, int):
        ref = torch.nn.functional.conv2d(
            torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
            torch.from_numpy(np.array(c.kernel[...])).permute(3, 2, 0, 1),
            torch.from_numpy(np.array(c.bias[...])),
            padding=pad,
        ).permute(0, 2, 3, 1)
        assert_close(c(x), ref.numpy())
    assert_close(c(x), _lax_conv(c, x))


@pytest.mark.parametrize("hw", [(2, 2), (1, 3)])
def test_small_map_gradients_match_lax(hw):
    c = conv(4, 3, 3, pad=1, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(c)
    x = jax.random.normal(jax.random.key(2), (2, *hw, 4))

    def loss(state, x, reference):
        m = nnx.merge(graphdef, state)
        return jnp.sum(jnp.sin(_lax_conv(m, x) if reference else m(x)))

    ours = jax.grad(loss, (0, 1))(state, x, False)
    ref = jax.grad(loss, (0, 1))(state, x, True)
    jax.tree.map(assert_close, ours, ref)


def test_large_maps_and_strides_take_the_lax_path():
    assert IM2COL_MAX_SIDE == 2
    c = conv(3, 4, 3, stride=2, pad=((0, 1), (0, 1)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 2, 2, 3))
    out = jax.lax.conv_general_dilated(
        x, c.kernel[...], (2, 2), c.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + c.bias[...]
    assert_close(c(x), out)
