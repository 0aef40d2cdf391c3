"""load_pretrained on diffusers folders written by diffusers itself, and its errors on bad input."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jax_erasepro.loading import load_pretrained
from jax_erasepro.models.config import ConfigError
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.tokenizer import tokenize
from jax_erasepro.weights import WeightsError, to_state_dict
from tests.conftest import assert_same_params
from tests.torch_bridge import torch_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=1)


@pytest.fixture(scope="module")
def folder(sd, tmp_path_factory):
    """A diffusers folder written by diffusers' own save_pretrained."""
    path = tmp_path_factory.mktemp("sd") / "model"
    torch_pipeline(sd).save_pretrained(path)
    return path


@pytest.fixture
def copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_loads_diffusers_folder_exactly(sd, folder):
    loaded = load_pretrained(folder)
    assert_same_params(sd, loaded)
    assert loaded.config.unet == sd.config.unet
    assert loaded.config.vae.scaling_factor == pytest.approx(0.18215)
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.source.format == "diffusers"


@pytest.mark.parametrize("with_prefix", [True, False])
def test_text_encoder_keys_with_or_without_text_model_prefix(sd, copy, with_prefix):
    path = copy / "text_encoder" / "model.safetensors"
    tensors = {k.removeprefix("text_model."): v for k, v in load_file(path).items()}
    if with_prefix:
        tensors = {"text_model." + k: v for k, v in tensors.items()}
    save_file(tensors, path)
    loaded = load_pretrained(copy)
    assert loaded.source.components["text_encoder"]["key_prefix"] == ("text_model." if with_prefix else "")
    assert_same_params(sd, loaded)


def test_fp16_variant(sd, copy):
    for comp, stem in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        src = copy / comp / f"{stem}.safetensors"
        half = {k: v.astype(np.float16) for k, v in load_file(src).items()}
        save_file(half, copy / comp / f"{stem}.fp16.safetensors")
        src.unlink()
    loaded = load_pretrained(copy)  # falls back to the fp16 files
    ref = to_state_dict(sd.unet)
    got = to_state_dict(loaded.unet)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k].astype(np.float16).astype(np.float32))
    assert load_pretrained(copy, variant="fp16", dtype="float16").unet.conv_in.kernel.dtype == np.float16


def test_missing_file(copy):
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vae/diffusion_pytorch_model.safetensors"):
        load_pretrained(copy)


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="unet/diffusion_pytorch_model.safetensors"):
        load_pretrained(copy)


def test_corrupted_header(copy):
    path = copy / "text_encoder" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="text_encoder/model.safetensors"):
        load_pretrained(copy)


def test_wrong_shape_and_missing_key_and_nan(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    bad = dict(tensors, **{"conv_in.weight": np.zeros((32, 4, 1, 1), np.float32)})
    save_file(bad, path)
    with pytest.raises(WeightsError, match="'conv_in.weight' has shape"):
        load_pretrained(copy)
    save_file({k: v for k, v in tensors.items() if k != "conv_in.bias"}, path)
    with pytest.raises(WeightsError, match="missing key 'conv_in.bias'"):
        load_pretrained(copy)
    nan = dict(tensors, **{"conv_out.bias": np.full_like(tensors["conv_out.bias"], np.nan)})
    save_file(nan, path)
    with pytest.raises(WeightsError, match="'conv_out.bias' holds NaN"):
        load_pretrained(copy)


def test_unsupported_block_type_and_unknown_key(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        load_pretrained(copy)
    cfg_path.write_text(json.dumps(dict(cfg, my_new_option=3)))
    with pytest.raises(ConfigError, match="my_new_option"):
        load_pretrained(copy)


def test_pickled_only_is_refused(copy):
    path = copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.rename(path.with_suffix(".bin"))
    with pytest.raises(WeightsError, match="safetensors only"):
        load_pretrained(copy)


def test_prompt_over_77_tokens_is_truncated_with_a_warning(sd):
    long = "a red star " * 40
    with pytest.warns(UserWarning, match="truncat"):
        ids = tokenize(sd.tokenizer, [long])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_file_tensor_reads_exactly_its_bytes_and_refuses_a_short_file(tmp_path):
    """``FileTensor`` copies one tensor straight from the file; a file cut short after its header was read
    (so the header check could not see it) fails with the file named, not with garbage."""
    from jax_erasepro.loading import SafetensorsReader

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float16), "b": rng.normal(size=(7,)).astype(np.float32)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    for key, want in tensors.items():
        lazy = reader.lazy(key)
        assert (lazy.shape, lazy.dtype) == (want.shape, want.dtype)
        np.testing.assert_array_equal(np.asarray(lazy), want)
        out = np.empty_like(want)
        lazy.read_into(out)
        np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="contiguous"):
        reader.lazy("a").read_into(np.empty((5, 3), np.float16).T)
    seen = []  # with a check, pieces of about chunk_bytes, each checked once, in order
    out = np.empty_like(tensors["a"])
    assert reader.lazy("a").read_into(out, lambda p: seen.append(p.copy()) is None, chunk_bytes=8)
    assert [p.size for p in seen] == [4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(seen), tensors["a"].reshape(-1))
    np.testing.assert_array_equal(out, tensors["a"])
    assert not reader.lazy("a").read_into(out, lambda p: p.size < 4, chunk_bytes=8)  # False at a bad piece
    last = max(tensors, key=lambda k: reader.lazy(k).offset)
    with open(path, "r+b") as f:
        f.truncate(reader.lazy(last).offset + 2)
    with pytest.raises(WeightsError, match="ends inside a tensor"):
        np.asarray(reader.lazy(last))
