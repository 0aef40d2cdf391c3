"""save_pretrained(format="lora"): diffusers reads the file, and base + B A is the edited model."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from jax_erasepro import surgery
from jax_erasepro.lora import LoraError, lora_factors
from jax_erasepro.saving import save_pretrained
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import to_state_dict
from tests.conftest import assert_close
from tests.torch_bridge import torch_pipeline

UNET_KEYS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
]
TEXT_KEYS = [f"encoder.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 2) for p in "qkv"]


def _rank2_edit(sd, seed=0):
    """Add a random rank-2 dW (about 10% of |W|) to some attn2 k/v and text-encoder q/k/v weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for comp, keys in (("unet", UNET_KEYS), ("text_encoder", TEXT_KEYS)):
        state = to_state_dict(getattr(sd, comp))
        new = {}
        for k in keys:
            w = state[k]
            dw = rng.standard_normal((w.shape[0], 2)) @ rng.standard_normal((2, w.shape[1]))
            new[k] = (w + 0.1 * np.linalg.norm(w) / np.linalg.norm(dw) * dw).astype(np.float32)
        out.update({f"{comp}.{k}": v for k, v in new.items()})
    return surgery.replace(sd, out)


@pytest.fixture(scope="module")
def models():
    base = tiny_random_sd(seed=4)
    return base, _rank2_edit(base)


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory):
    base, edited = models
    out = tmp_path_factory.mktemp("lora") / "lora"
    return save_pretrained(edited, out, format="lora", base=base, metadata={"method": "test"})


def test_ranks_and_record(lora_dir):
    record = json.loads((lora_dir / "lora.json").read_text())
    assert len(record["modules"]) == len(UNET_KEYS) + len(TEXT_KEYS)
    for name, m in record["modules"].items():
        assert m["rank"] == 2, name
        assert m["rel_error"] <= m["tolerance"], name
    assert record["metadata"] == {"method": "test"}
    assert len(record["base_checksums"]) > 0


def _merged_base(base, lora_dir) -> StableDiffusionPipeline:
    """The base in diffusers with the LoRA applied by diffusers' own ``load_lora_weights`` (peft backend)."""
    pipe = torch_pipeline(base)
    pipe.load_lora_weights(str(lora_dir))
    return pipe


def test_lora_reproduces_the_edit_in_diffusers(models, lora_dir):
    base, edited = models
    merged, want = _merged_base(base, lora_dir), torch_pipeline(edited)
    ctx = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32))
    with torch.no_grad():
        for key in UNET_KEYS:
            name = key.removesuffix(".weight")
            got = merged.unet.get_submodule(name)(ctx)
            assert_close(got.numpy(), want.unet.get_submodule(name)(ctx).numpy(), rel=1e-4)
        ids = torch.from_numpy(np.asarray([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70]))
        got = merged.text_encoder(ids).last_hidden_state
        assert_close(got.numpy(), want.text_encoder(ids).last_hidden_state.numpy(), rel=1e-4)


def test_lora_factors_rank_and_tolerance():
    rng = np.random.default_rng(0)
    dw = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 24))
    dw += 1e-3 * rng.standard_normal(dw.shape) * np.linalg.norm(dw) / np.sqrt(dw.size)
    norm = np.linalg.norm(dw)
    b, a, err = lora_factors(dw, 1e-2 * norm)
    assert a.shape == (3, 24) and b.shape == (40, 3) and err <= 1e-2 * norm
    assert np.linalg.norm(dw - b.astype(np.float64) @ a) == pytest.approx(err)
    _, a, err = lora_factors(dw, 1e-9 * norm)  # below the noise: full rank, exact to float32
    assert a.shape[0] == 24 and err <= 1e-6 * norm


def test_lora_refuses_what_it_cannot_hold(models, tmp_path):
    base, edited = models
    with pytest.raises(ValueError, match="base="):
        save_pretrained(edited, tmp_path / "a", format="lora")
    state = to_state_dict(base.unet)
    for key, match in [("down_blocks.0.attentions.0.proj_in.bias", "bias"), ("conv_in.weight", "Linear")]:
        bad = surgery.replace(edited, {f"unet.{key}": state[key] + 1.0})
        with pytest.raises(LoraError, match=match):
            save_pretrained(bad, tmp_path / "b", format="lora", base=base)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(LoraError, match="nothing"):
        save_pretrained(base, tmp_path / "c", format="lora", base=base)
