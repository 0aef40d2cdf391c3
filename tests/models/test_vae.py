"""AutoencoderKL parity with diffusers on random weights, key/shape snapshot of SD v1.4, config errors."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from jax_erasepro.models.config import ConfigError
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.weights import load_state_dict, num_params, state_dict_shapes
from tests.conftest import SD14, assert_close
from tests.torch_bridge import perturbed_state_dict

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)


def _pair(cfg: AutoencoderKLConfig):
    torch.manual_seed(0)
    tm = TorchVAE(**cfg.to_dict()).eval()
    sd = perturbed_state_dict(tm)
    return load_state_dict(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))), sd), tm


def _check(cfg: AutoencoderKLConfig, size: int):
    model, tm = _pair(cfg)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    z = np.random.RandomState(1).randn(2, cfg.latent_channels, size // 4, size // 4).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
        ref_dec = tm.decode(torch.from_numpy(z)).sample.numpy()
    mean, logvar = nnx.jit(lambda m, a: m.encode(a))(model, x.transpose(0, 2, 3, 1))
    dec = nnx.jit(lambda m, a: m.decode(a))(model, z.transpose(0, 2, 3, 1))
    for name, ours, ref in [
        ("mean", mean, ref_mean),
        ("logvar", logvar, ref_logvar),
        ("decode", dec, ref_dec),
    ]:
        ours = np.asarray(ours).transpose(0, 3, 1, 2)
        print(f"{name}: max abs err {np.abs(ours - ref).max():.3g} (max |ref| {np.abs(ref).max():.3g})")
        assert_close(ours, ref)
    return model, tm


def test_matches_diffusers():
    model, tm = _check(AutoencoderKLConfig.from_dict(TINY), 16)
    assert state_dict_shapes(model) == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert "encoder.mid_block.attentions.0.group_norm.weight" in state_dict_shapes(model)


def test_logvar_is_clamped():
    cfg = AutoencoderKLConfig.from_dict(TINY)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    model.quant_conv.bias[...] = np.array([0.0] * 4 + [-100.0, 100.0, 0.0, 0.0], np.float32)
    _, logvar = model.encode(np.zeros((1, 8, 8, 3), np.float32))
    assert float(logvar[..., 0].max()) == -30.0 and float(logvar[..., 1].min()) == 20.0


def test_real_config_tree_matches_diffusers():
    cfg = AutoencoderKLConfig.from_json(SD14 / "vae" / "config.json")
    assert cfg.scaling_factor == 0.18215
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        tm = TorchVAE.from_config(TorchVAE.load_config(SD14 / "vae"))
    assert state_dict_shapes(abstract) == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert num_params(abstract) == 83_653_863
    # diffusers writes every default into the configs it saves: all of them must load.
    assert AutoencoderKLConfig.from_dict(dict(tm.config)) == cfg


@pytest.mark.slow
def test_real_config_matches_diffusers():
    _check(AutoencoderKLConfig.from_json(SD14 / "vae" / "config.json"), 32)


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}, "'AttnDownEncoderBlock2D'"),
        ({"up_block_types": ("UpDecoderBlock2D",)}, "up_block_types"),
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"act_fn": "relu"}, "act_fn"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_config_errors_name_the_key(change, msg):
    with pytest.raises(ConfigError, match=msg):
        AutoencoderKLConfig.from_dict({**TINY, **change})
