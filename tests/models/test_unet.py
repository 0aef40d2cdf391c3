"""UNet2DConditionModel parity with diffusers on random weights, SD v1.4 key/shape snapshot, config errors."""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from jax_erasepro.models.config import ConfigError
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.weights import load_state_dict, num_params, state_dict_shapes
from tests.conftest import SD14, assert_close
from tests.torch_bridge import perturbed_state_dict

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)
TINY_LIST_HEADS = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    norm_num_groups=16,
    cross_attention_dim=24,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.5,
)



def _pair(overrides: dict):
    cfg = UNet2DConditionConfig.from_dict(overrides)
    torch.manual_seed(0)
    tm = TorchUNet(**cfg.to_dict()).eval()
    sd = perturbed_state_dict(tm)
    model = load_state_dict(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))), sd)
    return model, tm


def _inputs(cfg: UNet2DConditionConfig, h: int, w: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    x = rng.randn(2, cfg.in_channels, h, w).astype(np.float32)
    ctx = rng.randn(2, 7, cfg.cross_dim(0)).astype(np.float32)
    return x, ctx


def _compare(model, tm, x, t, ctx):
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.as_tensor(t), torch.from_numpy(ctx)).sample.numpy()
    out = nnx.jit(lambda m, *a: m(*a))(model, x.transpose(0, 2, 3, 1), np.asarray(t), ctx)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    print(f"max abs err {np.abs(out - ref).max():.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert_close(out, ref)


@pytest.mark.parametrize(
    "overrides, size, t",
    [
        (TINY, (16, 16), [10, 500]),
        (TINY_LIST_HEADS, (8, 8), [999, 0]),
        ({**TINY, "center_input_sample": True}, (9, 7), 321),  # odd size: upsample to the skip's size
    ],
)
def test_matches_diffusers(overrides, size, t):
    model, tm = _pair(overrides)
    x, ctx = _inputs(model.config, *size)
    _compare(model, tm, x, t, ctx)


def test_param_paths_are_diffusers_keys():
    model, tm = _pair(TINY_LIST_HEADS)
    assert state_dict_shapes(model) == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    keys = state_dict_shapes(model)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight" in keys
    assert "up_blocks.1.upsamplers.0.conv.weight" in keys


def test_real_config_tree_matches_diffusers():
    cfg = UNet2DConditionConfig.from_json(SD14 / "unet" / "config.json")
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        tm = TorchUNet.from_config(TorchUNet.load_config(SD14 / "unet"))
    assert state_dict_shapes(abstract) == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert num_params(abstract) == 859_520_964
    assert [cfg.num_heads(i) for i in range(4)] == [8, 8, 8, 8]
    # diffusers writes every default into the configs it saves: all of them must load.
    assert UNet2DConditionConfig.from_dict(dict(tm.config)) == cfg


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D")}, "'AttnDownBlock2D'"),
        ({"up_block_types": ("UpBlock2D", "SimpleCrossAttnUpBlock2D")}, "'SimpleCrossAttnUpBlock2D'"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"attention_head_dim": (4, 4, 4)}, "attention_head_dim"),
        ({"attention_head_dim": 5}, "attention_head_dim"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_config_errors_name_the_key(change, msg):
    with pytest.raises(ConfigError, match=msg):
        UNet2DConditionConfig.from_dict({**TINY, **change})


@pytest.mark.slow
def test_real_config_matches_diffusers():
    """SD v1.4's config, random weights, 16x16 latents; torch weights freed as they are loaded (~5.5 GB)."""
    cfg = UNet2DConditionConfig.from_json(SD14 / "unet" / "config.json")
    torch.manual_seed(0)
    tm = TorchUNet(**cfg.to_dict()).eval()
    perturbed_state_dict(tm)
    x, ctx = _inputs(cfg, 16, 16)
    t = [999, 37]
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.as_tensor(t), torch.from_numpy(ctx)).sample.numpy()
    sd = tm.state_dict()
    keys = set(sd)
    del tm
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    model = load_state_dict(abstract, lambda k: sd.pop(k).numpy(), keys)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    out = np.asarray(fwd(state, x.transpose(0, 2, 3, 1), np.asarray(t), ctx)).transpose(0, 3, 1, 2)
    print(f"max abs err {np.abs(out - ref).max():.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert_close(out, ref)
