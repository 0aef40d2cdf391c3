"""surgery: keys, reads and replacements by diffusers key, checked against the PyTorch state dicts."""

import numpy as np
import pytest

from jax_erasepro import surgery
from jax_erasepro.tiny import tiny_random_sd
from tests.torch_bridge import torch_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=5)


def test_select_and_read_match_the_torch_state_dicts(sd):
    pipe = torch_pipeline(sd)
    keys = surgery.select(sd, "unet.*.attn2.to_[kv].weight")
    assert keys and all(".attn2.to_" in k for k in keys)
    reference = pipe.unet.state_dict()
    assert set(keys) == {f"unet.{k}" for k in reference if ".attn2.to_k." in k or ".attn2.to_v." in k}
    for key, value in surgery.read(sd, keys).items():
        np.testing.assert_array_equal(value, reference[key.split(".", 1)[1]].numpy())
    q = surgery.select(sd, "text_encoder.*.q_proj.weight")
    text = pipe.text_encoder.state_dict()
    for key, value in surgery.read(sd, q).items():  # stacked layers unstack to one key each
        np.testing.assert_array_equal(value, text[key.split(".", 1)[1]].numpy())
    flax = surgery.read(sd, q[:1], layout="flax")[q[0]]
    np.testing.assert_array_equal(flax.T, surgery.read(sd, q[:1])[q[0]])


def test_replace_is_out_of_place_and_touches_only_its_keys(sd):
    keys = surgery.select(sd, "text_encoder.*.self_attn.q_proj.weight")[1:] + surgery.select(
        sd, "unet.*attn2.to_k*"
    )
    before = surgery.read(sd, surgery.select(sd, "*"))
    new = {k: before[k] + 1.0 for k in keys}
    edited = surgery.replace(sd, new)
    after = surgery.read(edited, surgery.select(edited, "*"))
    for k, v in after.items():
        np.testing.assert_array_equal(v, new.get(k, before[k]), err_msg=k)
    still = surgery.read(sd, keys)
    for k in keys:
        np.testing.assert_array_equal(still[k], before[k])  # the source model is untouched


@pytest.mark.parametrize(
    "tensors, kw, message",
    [
        ({"unet.nope.weight": np.zeros(1)}, {}, "no tensor 'unet.nope.weight'"),
        ({"transformer.x": np.zeros(1)}, {}, "keys start with one of text_encoder, unet, vae"),
        ({"unet.conv_in.weight": np.zeros((1, 2))}, {}, "unet.conv_in.weight has shape \\(1, 2\\)"),
        ({}, {"layout": "jax"}, "unknown layout 'jax'"),
    ],
)
def test_bad_replacements_are_one_line(sd, tensors, kw, message):
    with pytest.raises(surgery.SurgeryError, match=message):
        surgery.replace(sd, tensors, **kw)


def test_param_filter_splits_off_exactly_the_selected_keys(sd):
    from flax import nnx

    keys = surgery.select(sd, "unet.*.attn2.*")
    graphdef, picked, rest = nnx.split(sd.unet, surgery.param_filter(sd, "unet.*.attn2.*"), ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(picked)}
    assert len(names) == len(keys) and all(".attn2." in n for n in names)
    assert not any(".attn2." in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest))
    # a predicate works too, and every layer of a stacked param selected together is accepted
    text = surgery.param_filter(sd, lambda k: ".q_proj." in k, component="text_encoder")
    _, q, _ = nnx.split(sd.text_encoder, text, ...)
    assert {str(p[-2]) for p, _ in nnx.to_flat_state(q)} == {"q_proj"}


@pytest.mark.parametrize(
    "pattern, component, message",
    [
        ("text_encoder.encoder.layers.1.*", "text_encoder", "selects 1 of the 3 stacked layers of "
         "text_encoder.encoder.layers.layer_norm1.bias; select all of them or none"),
        ("unet.*.attn3.*", "unet", "pattern 'unet.\\*.attn3.\\*' matches no param of unet"),
        ("unet.*", "clip", "unknown component 'clip'"),
    ],
)
def test_param_filter_refuses_part_of_a_stack_or_nothing(sd, pattern, component, message):
    with pytest.raises(surgery.SurgeryError, match=message):
        surgery.param_filter(sd, pattern, component)
