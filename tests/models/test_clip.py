"""CLIP parity with transformers (text, vision, joint) on random weights, plus the layer-wise API."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from jax_erasepro.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from jax_erasepro.models.config import ConfigError
from jax_erasepro.weights import load_state_dict, num_params, state_dict_shapes, to_state_dict
from tests.conftest import SD14, assert_close
from tests.torch_bridge import perturbed_state_dict

TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=1000,
    max_position_embeddings=77,
)
TINY_VISION = dict(
    hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=16,
    patch_size=4,
)



def _convert(model_cls, cfg, tm: torch.nn.Module):
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return load_state_dict(abstract, perturbed_state_dict(tm))


def _ids(shape, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _text_pair(eos_token_id: int = 2, hidden_act: str = "quick_gelu", **overrides):
    cfg = CLIPTextConfig(**{**TINY_TEXT, **overrides}, eos_token_id=eos_token_id, hidden_act=hidden_act)
    torch.manual_seed(0)
    tm = tf.CLIPTextModel(tf.CLIPTextConfig(**cfg.to_dict())).eval()
    return _convert(CLIPTextModel, cfg, tm), tm


@pytest.mark.parametrize("eos_token_id, hidden_act", [(2, "quick_gelu"), (7, "gelu")])
def test_text_parity(eos_token_id, hidden_act):
    model, tm = _text_pair(eos_token_id, hidden_act)
    ids = _ids((3, 77), 1000)
    ids[:, 40] = eos_token_id  # the first EOS, with larger ids after it: the two pooling rules differ
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids).long(), output_hidden_states=True)
    last, states = model(ids, output_hidden_states=True)
    assert states.shape == (4, 3, 77, 32)
    assert_close(last, ref.last_hidden_state)
    assert_close(states, np.stack([h.numpy() for h in ref.hidden_states]))
    assert_close(model.pooled(last, ids), ref.pooler_output)
    assert_close(model(ids[:, :20]), tm(torch.from_numpy(ids[:, :20]).long()).last_hidden_state.detach())
    print("max abs err text", hidden_act, np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max())


def test_text_jit_matches_eager():
    model, _ = _text_pair()
    ids = jnp.asarray(_ids((2, 77), 1000))
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, output_hidden_states=True))(params, ids)
    eager = model(ids, output_hidden_states=True)
    for a, b in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_trace_size_does_not_grow_with_depth():
    def n_eqns(layers: int) -> int:
        cfg = CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": layers})
        graphdef, params = nnx.split(nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0))))
        ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
        return len(jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids).eqns)

    assert n_eqns(2) == n_eqns(12)


def test_single_layer_api():
    model, _ = _text_pair()
    ids = _ids((2, 77), 1000)
    last, states = model(ids, output_hidden_states=True)
    for i in range(3):
        layer = model.encoder.layer(i)
        assert layer.self_attn.q_proj.kernel.shape == (32, 32)
        assert_close(layer(states[i]), states[i + 1])
        np.testing.assert_array_equal(layer.attn_input(states[i]), layer.layer_norm1(states[i]))

    edited = model.encoder.layer(1)
    edited.self_attn.v_proj.kernel[...] = 2.0 * edited.self_attn.v_proj.kernel[...]
    before = {k: v.copy() for k, v in to_state_dict(model).items()}
    model.encoder.set_layer(1, edited)
    after = to_state_dict(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"encoder.layers.1.self_attn.v_proj.weight"}
    np.testing.assert_array_equal(after["encoder.layers.1.self_attn.v_proj.weight"],
                                  2.0 * before["encoder.layers.1.self_attn.v_proj.weight"])
    _, new_states = model(ids, output_hidden_states=True)
    np.testing.assert_array_equal(new_states[:2], states[:2])
    assert_close(new_states[2], edited(states[1]))


def test_sequence_longer_than_positions_raises():
    model, _ = _text_pair(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(_ids((1, 9), 1000))


def test_sd14_text_config_and_round_trip():
    cfg = CLIPTextConfig.from_json(SD14 / "text_encoder" / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.hidden_act) == (49408, 2, "quick_gelu")
    assert CLIPTextConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cls, change, key",
    [
        (CLIPTextConfig, {"use_cache": True}, "use_cache"),
        (CLIPTextConfig, {"hidden_act": "relu"}, "hidden_act"),
        (CLIPTextConfig, {"num_attention_heads": 5}, "num_attention_heads"),
        (CLIPTextConfig, {"eos_token_id": [2, 3]}, "eos_token_id"),
        (CLIPVisionConfig, {"patch_size": [4, 4]}, "patch_size"),
        (CLIPVisionConfig, {"image_size": 18}, "image_size"),
        (CLIPVisionConfig, {"hidden_act": "silu"}, "hidden_act"),
    ],
)
def test_config_errors_name_the_key(cls, change, key):
    base = TINY_TEXT if cls is CLIPTextConfig else TINY_VISION
    with pytest.raises(ConfigError, match=key):
        cls.from_dict({**base, **change})


def test_clip_config_reads_transformers_json():
    ref = tf.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=12)
    cfg = CLIPConfig.from_dict(json.loads(ref.to_json_string()))
    assert cfg.text_config == CLIPTextConfig(**TINY_TEXT, eos_token_id=ref.text_config.eos_token_id)
    assert cfg.vision_config == CLIPVisionConfig(**TINY_VISION)
    assert (cfg.projection_dim, cfg.logit_scale_init_value) == (12, ref.logit_scale_init_value)
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="text_config.*hidden_act"):
        CLIPConfig.from_dict({"text_config": {"hidden_act": "tanh"}})


def test_vision_parity():
    cfg = CLIPVisionConfig(**TINY_VISION)
    torch.manual_seed(1)
    tm = tf.CLIPVisionModel(tf.CLIPVisionConfig(**cfg.to_dict())).eval()
    model = _convert(CLIPVisionModel, cfg, tm)
    px = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(px), output_hidden_states=True)
    last, states = model(px.transpose(0, 2, 3, 1), output_hidden_states=True)
    assert_close(last, ref.last_hidden_state)
    assert_close(states, np.stack([h.numpy() for h in ref.hidden_states]))
    assert_close(model.pooled(last), ref.pooler_output)
    print("max abs err vision", float(np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max()))
    with pytest.raises(ValueError, match="image size"):
        model(np.zeros((1, 8, 8, 3), np.float32))


def test_clip_model_parity_keys_and_round_trip():
    text, vision = CLIPTextConfig(**TINY_TEXT), CLIPVisionConfig(**TINY_VISION)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    torch.manual_seed(2)
    tm = tf.CLIPModel(tf.CLIPConfig(**cfg.to_dict())).eval()
    with torch.no_grad():
        tm.logit_scale.fill_(1.7)
    sd = perturbed_state_dict(tm)
    abstract = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    assert state_dict_shapes(abstract) == {k: v.shape for k, v in sd.items()}
    assert sd["logit_scale"].shape == () and "vision_model.embeddings.class_embedding" in sd
    model = load_state_dict(abstract, sd)
    back = to_state_dict(model)
    assert back.keys() == sd.keys()
    for k, v in back.items():
        assert v.shape == sd[k].shape, k
        np.testing.assert_array_equal(v, sd[k])

    ids = _ids((2, 11), 1000)
    ids[:, 6] = cfg.text_config.eos_token_id % 1000
    px = np.random.RandomState(1).randn(3, 3, 16, 16).astype(np.float32)
    t_ids, t_px = torch.from_numpy(ids).long(), torch.from_numpy(px)
    with torch.no_grad():
        ref = tm(input_ids=t_ids, pixel_values=t_px)
        text_ref = tm.get_text_features(t_ids).pooler_output
        image_ref = tm.get_image_features(t_px).pooler_output
    nhwc = px.transpose(0, 2, 3, 1)
    assert_close(model.get_text_features(ids), text_ref)
    assert_close(model.get_image_features(nhwc), image_ref)
    assert_close(model(ids, nhwc), ref.logits_per_text)


def test_vision_model_alone_round_trips_class_embedding():
    cfg = CLIPVisionConfig(**TINY_VISION)
    model = CLIPVisionModel(cfg, rngs=nnx.Rngs(3))
    sd = to_state_dict(model)
    assert sd["embeddings.class_embedding"].shape == (24,)
    assert sd["embeddings.patch_embedding.weight"].shape == (24, 3, 4, 4)
    back = to_state_dict(load_state_dict(nnx.eval_shape(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))), sd))
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.slow
def test_sd14_text_encoder_shapes_and_size():
    cfg = CLIPTextConfig.from_json(SD14 / "text_encoder" / "config.json")
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
    assert num_params(abstract) == 123_060_480
    with torch.device("meta"):
        tm = tf.CLIPTextModel(tf.CLIPTextConfig.from_json_file(str(SD14 / "text_encoder" / "config.json")))
    ref = {k: tuple(v.shape) for k, v in tm.state_dict().items() if not k.endswith("position_ids")}
    assert state_dict_shapes(abstract) == ref


@pytest.mark.slow
def test_sd14_text_encoder_parity():
    cfg = CLIPTextConfig.from_json(SD14 / "text_encoder" / "config.json")
    torch.manual_seed(0)
    tm = tf.CLIPTextModel(tf.CLIPTextConfig.from_json_file(str(SD14 / "text_encoder" / "config.json"))).eval()
    model = _convert(CLIPTextModel, cfg, tm)
    ids = _ids((2, 77), cfg.vocab_size)
    ids[:, 0], ids[:, 12:] = 49406, 49407  # BOS, a short prompt, then EOS padding as SD feeds it
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids).long(), output_hidden_states=True)
    last, states = model(ids, output_hidden_states=True)
    assert_close(last, ref.last_hidden_state)
    assert_close(states, np.stack([h.numpy() for h in ref.hidden_states]))
    assert_close(model.pooled(last, ids), ref.pooler_output)
    ref_states = np.stack([h.numpy() for h in ref.hidden_states])
    print("max abs err sd14 text", np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max(),
          "hidden states", np.abs(np.asarray(states) - ref_states).max())
