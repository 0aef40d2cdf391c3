"""The state-dict map: key names, layouts, stacked layers, and strict errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_erasepro import weights
from jax_erasepro.weights import WeightsError, load_state_dict, state_dict_shapes, to_state_dict


@pytest.fixture(params=["numpy", "xla", "xla-small-pieces"])
def layout_path(request, monkeypatch):
    """Small tensors are laid out in numpy, larger ones by XLA; sources are copied and checked for NaN/inf in
    pieces (tiny ones here, so pieces split tensors and rows): run a test through each."""
    if request.param != "numpy":
        monkeypatch.setattr(weights, "SMALL_BYTES", -1)
    if request.param == "xla-small-pieces":
        monkeypatch.setattr(weights, "CHUNK_BYTES", 8)
    return request.param


class _Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(3, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)


class _Toy(nnx.Module):
    STACKED = ("encoder.layers",)

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.emb = nnx.Embed(7, 3, rngs=rngs)
        self.encoder = _Encoder(rngs)


class _Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.vmap(in_axes=0)
        def make(key):
            return _Layer(nnx.Rngs(key))

        self.layers = make(jax.random.split(rngs.params(), 3))


def test_keys_layouts_and_round_trip(layout_path):
    model = _Toy(nnx.Rngs(0))
    sd = to_state_dict(model)
    assert state_dict_shapes(model) == {k: v.shape for k, v in sd.items()}
    assert sd["conv.weight"].shape == (4, 2, 3, 3)  # OIHW
    assert sd["encoder.layers.2.fc.weight"].shape == (5, 3)  # (out, in)
    assert sd["encoder.layers.1.norm.weight"].shape == (5,)
    assert sd["emb.weight"].shape == (7, 3)
    kernel = np.asarray(model.encoder.layers.fc.kernel[1])
    np.testing.assert_array_equal(sd["encoder.layers.1.fc.weight"], kernel.T)
    back = load_state_dict(nnx.eval_shape(lambda: _Toy(nnx.Rngs(1))), sd)
    for k, v in to_state_dict(back).items():
        np.testing.assert_array_equal(v, sd[k])


def _poison(sd: dict, key: str, index: tuple, value: float) -> None:
    sd[key] = sd[key].copy()
    sd[key][index] = value


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda d: d.pop("conv.bias"), "missing key 'conv.bias'"),
        (lambda d: d.update(extra=np.zeros(1)), "unexpected key 'extra'"),
        (lambda d: d.update({"emb.weight": np.zeros((7, 4))}), "key 'emb.weight' has shape"),
        (lambda d: d.update({"encoder.layers.0.fc.bias": np.full(5, np.nan)}), "'encoder.layers.0.fc.bias'"),
        # a transposed stacked kernel, a transposed conv kernel, a param kept as read: each names its key
        (
            lambda d: _poison(d, "encoder.layers.2.fc.weight", (4, 1), np.inf),
            "'encoder.layers.2.fc.weight'",
        ),
        (lambda d: _poison(d, "conv.weight", (3, 1, 2, 0), -np.inf), "'conv.weight' holds NaN or inf"),
        (lambda d: _poison(d, "emb.weight", (6, 2), np.nan), "'emb.weight' holds NaN or inf"),
    ],
)
def test_strict_errors_name_the_key(mutate, msg, layout_path):
    sd = to_state_dict(_Toy(nnx.Rngs(0)))
    mutate(sd)
    with pytest.raises(WeightsError, match=msg.replace("(", r"\(")):
        load_state_dict(nnx.eval_shape(lambda: _Toy(nnx.Rngs(1))), sd, source="toy.safetensors")


@pytest.mark.parametrize("shift", [0, 8, 24, 56])
def test_load_from_mapped_bytes_at_any_alignment(shift, layout_path):
    """Sources at any byte alignment (memory-mapped safetensors tensors are only 8-byte aligned, and XLA
    aliases 64-byte-aligned host memory instead of copying it) load the same params, and no param shares
    memory with its source or with another param."""
    sd = to_state_dict(_Toy(nnx.Rngs(0)))
    keys = sorted(sd)
    blob = np.zeros(64 * (len(keys) + 2) + sum(v.nbytes for v in sd.values()), np.uint8)
    base = -blob.ctypes.data % 64 + shift
    views, at = {}, base
    for k in keys:
        v = sd[k].astype(np.float32)
        view = blob[at : at + v.nbytes].view(np.float32).reshape(v.shape)
        view[...] = v
        views[k] = view
        at += v.nbytes + 8  # odd gaps: some tensors aligned, some not
    model = load_state_dict(nnx.eval_shape(lambda: _Toy(nnx.Rngs(1))), views)
    blob[:] = 0  # params must not alias the source bytes
    for k, v in to_state_dict(model).items():
        np.testing.assert_array_equal(v, sd[k])
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert len(set(pointers)) == len(pointers)


def test_abstract_model_is_cached_per_config_and_fresh_per_call():
    from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
    from jax_erasepro.weights import _abstract_parts, abstract_model

    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    a = abstract_model(CLIPTextModel, cfg)
    hits = _abstract_parts.cache_info().hits
    b = abstract_model(CLIPTextModel, cfg)
    assert _abstract_parts.cache_info().hits == hits + 1
    assert a is not b and state_dict_shapes(a) == state_dict_shapes(b)
    a.encoder.unroll = 7  # a change to one merged module does not reach the cache
    assert abstract_model(CLIPTextModel, cfg).encoder.unroll == 1
    other = CLIPTextConfig(hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    assert state_dict_shapes(abstract_model(CLIPTextModel, other)) != state_dict_shapes(a)


@pytest.mark.parametrize("shape", [(), (7,), (6, 5), (4, 3, 3, 3), (3, 8, 5)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chunk", [4, 24, 1 << 18])
def test_fill_checks_every_piece_like_numpy(shape, dtype, chunk, monkeypatch):
    """The piecewise copy-and-check (on the bits for 16-bit floats) copies exactly and agrees with numpy
    wherever one NaN or inf sits, piece boundaries included; the largest finite values are finite."""
    from jax_erasepro.weights import _fill, _finite_check

    monkeypatch.setattr(weights, "CHUNK_BYTES", chunk)
    x = np.random.default_rng(0).normal(size=shape).astype(jnp.dtype(dtype))
    if x.size:
        x.reshape(-1)[0] = jnp.finfo(x.dtype).max
    out = np.empty_like(x)
    assert _fill(out, x, _finite_check(None))
    np.testing.assert_array_equal(out, x)
    for i in range(0, max(x.size, 1), 5):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y.reshape(-1)[i] = bad
            assert not _fill(np.empty_like(y), y, _finite_check(None))
            assert _fill(np.empty_like(y), y, None)  # no check: copies anything


@pytest.mark.parametrize("src, dst", [(np.float16, np.float32), (np.float32, np.float16)])
def test_load_casts_to_the_asked_dtype(src, dst, layout_path):
    sd = {k: v.astype(src) for k, v in to_state_dict(_Toy(nnx.Rngs(0))).items()}
    model = load_state_dict(nnx.eval_shape(lambda: _Toy(nnx.Rngs(1))), sd, dtype=dst)
    for k, v in to_state_dict(model).items():
        assert v.dtype == dst
        np.testing.assert_array_equal(v, sd[k].astype(dst))


@pytest.mark.parametrize("key, index", [("conv.weight", (3, 1, 2, 0)), ("emb.weight", (6, 2))])
def test_a_value_beyond_the_asked_dtype_is_named(key, index, layout_path):
    """Finiteness is checked after the cast: a float32 value that float16 cannot hold is refused as such,
    and the same value loaded as float32 is fine."""
    sd = to_state_dict(_Toy(nnx.Rngs(0)))
    _poison(sd, key, index, 1e6)
    abstract = lambda: nnx.eval_shape(lambda: _Toy(nnx.Rngs(1)))  # noqa: E731
    load_state_dict(abstract(), sd)
    with pytest.raises(WeightsError, match=f"'{key}' holds NaN or inf values, or values beyond float16"):
        load_state_dict(abstract(), sd, dtype=jnp.float16)


def test_random_model_draws_flax_default_families_per_key():
    """``random_model``: every param of the config's tree, kernels with variance 1 / fan-in, norm scales one,
    biases zero, embeddings normal(0.02); a key's values depend only on (seed, key)."""
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.tiny import TINY_UNET
    from jax_erasepro.weights import random_model, state_dict_shapes

    config = UNet2DConditionConfig.from_dict(TINY_UNET)
    a = to_state_dict(random_model(UNet2DConditionModel, config, 0))
    other = random_model(UNet2DConditionModel, config, 1)
    assert {k: v.shape for k, v in a.items()} == state_dict_shapes(other)
    b = to_state_dict(random_model(UNet2DConditionModel, config, 0))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    big = a["up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"]  # (out, in) linear
    scale = big.shape[1] ** -0.5 / 0.87962566  # truncated at two standard deviations of this scale
    assert abs(big.std() / big.shape[1] ** -0.5 - 1) < 0.05 and np.abs(big).max() <= 2 * scale
    conv = a["conv_in.weight"]  # (out, in, kh, kw)
    assert abs(conv.std() * np.prod(conv.shape[1:]) ** 0.5 - 1) < 0.15
    assert (a["conv_norm_out.weight"] == 1).all() and (a["conv_norm_out.bias"] == 0).all()
    assert (a["conv_in.bias"] == 0).all()
