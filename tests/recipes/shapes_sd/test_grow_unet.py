"""Growing a trained UNet by cross-attention blocks: at first the grown UNet computes the same function."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jax_erasepro.weights import to_state_dict
from recipes.shapes_sd import train_unet as tu


def _with_top_attention(config: tu.UNet2DConditionConfig) -> tu.UNet2DConditionConfig:
    down = ("CrossAttnDownBlock2D",) + config.down_block_types[1:]
    up = config.up_block_types[:-1] + ("CrossAttnUpBlock2D",)
    return dataclasses.replace(config, down_block_types=down, up_block_types=up)


@pytest.fixture(scope="module")
def pair():
    small = tu.UNet2DConditionModel(tu.unet_config("tiny", 32), rngs=nnx.Rngs(0))
    config = _with_top_attention(small.config)
    return small, tu.grow_unet(small, config, seed=1)


def test_the_grown_unet_draws_what_the_small_one_drew(pair):
    small, grown = pair
    ks = jax.random.split(jax.random.key(0), 2)
    x, ctx = jax.random.normal(ks[0], (2, 16, 16, 4)), jax.random.normal(ks[1], (2, 77, 32))
    t = np.array([10, 900])
    np.testing.assert_allclose(np.asarray(grown(x, t, ctx)), np.asarray(small(x, t, ctx)), rtol=0, atol=1e-6)


def test_new_blocks_are_trainable_and_old_weights_kept(pair):
    small, grown = pair
    old, new = to_state_dict(small), to_state_dict(grown)
    added = sorted(new.keys() - old.keys())
    top = ("down_blocks.0.attentions.", "up_blocks.2.attentions.")
    assert added and all(k.startswith(top) for k in added)
    assert all(np.array_equal(new[k], old[k]) for k in old)
    assert all(not new[k].any() for k in added if ".proj_out." in k)
    assert any(np.abs(new[k]).sum() > 0 for k in added if "attn2.to_k" in k)  # the rest is initialised


def test_refuses_to_shrink(pair):
    small, grown = pair
    with pytest.raises(ValueError, match="no place in the new UNet"):
        tu.grow_unet(grown, small.config)


def test_f4_grows_into_f4t():
    f4 = nnx.eval_shape(lambda: tu.UNet2DConditionModel(tu.unet_config("f4"), rngs=nnx.Rngs(0)))
    assert _with_top_attention(f4.config) == tu.unet_config("f4t")
