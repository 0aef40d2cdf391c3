"""The CompVis <-> diffusers table, checked against diffusers' own single-file converters."""

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert.ckpt import load_ckpt, main
from jax_erasepro.compvis import (
    COMPONENTS,
    compvis_key_map,
    compvis_to_diffusers,
    diffusers_shapes,
    diffusers_to_compvis,
    normalize_vae_keys,
)
from jax_erasepro.models.config import ConfigError
from jax_erasepro.weights import WeightsError

UNET_TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=4,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# Another ldm-shaped layout: three levels, attention first at the bottom, two transformer layers, linear proj.
UNET_ODD = dict(
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    cross_attention_dim=24,
    norm_num_groups=8,
    attention_head_dim=2,
    sample_size=8,
    transformer_layers_per_block=2,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
VAE_TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
TEXT_TINY = dict(
    vocab_size=49408,  # the real tokenizer's, so from_single_file can build a working pipeline
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values everywhere (norm weights included), so a swapped key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in module.state_dict().items()}


def _tiny(unet_kwargs: dict) -> tuple[dict, dict, dict]:
    """(torch modules, numpy state dicts, config dicts) for one tiny SD v1 layout."""
    mods = {
        "unet": _randomize(UNet2DConditionModel(**unet_kwargs), 0),
        "vae": _randomize(AutoencoderKL(**VAE_TINY), 1),
        "text_encoder": _randomize(CLIPTextModel(CLIPTextConfig(**TEXT_TINY)), 2),
    }
    states = {k: _numpy(m) for k, m in mods.items()}
    configs = {k: (m.config.to_dict() if k == "text_encoder" else dict(m.config)) for k, m in mods.items()}
    return mods, states, configs


@pytest.fixture(scope="module")
def tiny():
    return _tiny(UNET_TINY)


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("unet_kwargs", [UNET_TINY, UNET_ODD], ids=["tiny", "odd"])
def test_round_trip_is_bit_exact_and_shapes_match_diffusers(unet_kwargs):
    _, states, configs = _tiny(unet_kwargs)
    want = {f"{c}.{k}": v.shape for c in COMPONENTS for k, v in states[c].items()}
    assert diffusers_shapes(configs["unet"], configs["vae"], configs["text_encoder"]) == want
    back = compvis_to_diffusers(diffusers_to_compvis(states, configs), configs)
    for c in COMPONENTS:
        _assert_same(back[c], states[c])


def test_table_is_one_to_one(tiny):
    _, _, configs = tiny
    table = compvis_key_map(configs["unet"], configs["vae"], configs["text_encoder"])
    assert len({cv for cv, _, _ in table}) == len({df for _, df, _ in table}) == len(table)
    rules = {df: rule for _, df, rule in table}
    linear = sorted(df for df, rule in rules.items() if rule == "conv1x1_linear")
    assert len(linear) == 8 and all(  # q, k, v, out of the two mid attentions
        ".mid_block.attentions.0.to_" in k and k.endswith(".weight") for k in linear
    )


def test_diffusers_from_single_file_reads_our_checkpoint(tiny, tmp_path, sd14_dir):
    """Our CompVis file, loaded by diffusers' own single-file loader, gives back the source weights."""
    mods, states, configs = tiny
    pipe = StableDiffusionPipeline(
        vae=mods["vae"],
        text_encoder=mods["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(sd14_dir / "tokenizer"),
        unet=mods["unet"],
        scheduler=PNDMScheduler.from_pretrained(sd14_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "folder")
    path = tmp_path / "model.safetensors"
    save_file(diffusers_to_compvis(states, configs), str(path))
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tmp_path / "folder"), local_files_only=True, safety_checker=None
    )
    for c in COMPONENTS:
        _assert_same(_numpy(getattr(loaded, c)), states[c])


def test_diffusers_converter_functions_agree(tiny, tmp_path):
    mods, states, configs = tiny
    path = tmp_path / "model.safetensors"
    save_file(diffusers_to_compvis(states, configs), str(path))
    ckpt = load_file(str(path))
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, configs["vae"]),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()
        },
    }
    for c in COMPONENTS:
        _assert_same({k: v.numpy() for k, v in converted[c].items()}, states[c])


def _sd14_configs(sd14_dir) -> dict[str, dict]:
    return {c: json.loads((sd14_dir / c / "config.json").read_text()) for c in COMPONENTS}


def test_real_sd14_configs(sd14_dir):
    """SD v1.4: the key counts of a real single-file checkpoint, and diffusers' converters agree on every key.

    Models are built on the meta device (no weights); tensors are zero-stride broadcasts tagged with their
    row number, so the check costs no memory and catches any two same-shaped keys swapped.
    """
    configs = _sd14_configs(sd14_dir)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    real = {f"{c}.{k}": tuple(v.shape) for c, m in models.items() for k, v in m.state_dict().items()}
    assert diffusers_shapes(configs["unet"], configs["vae"], configs["text_encoder"]) == real

    table = compvis_key_map(configs["unet"], configs["vae"], configs["text_encoder"])
    cv_keys = [cv for cv, _, _ in table]
    assert sum(k.startswith("model.diffusion_model.") for k in cv_keys) == 686
    assert sum(k.startswith("first_stage_model.") for k in cv_keys) == 248
    assert sum(k.startswith("cond_stage_model.transformer.text_model.") for k in cv_keys) == 196
    assert sfu.CHECKPOINT_KEY_NAMES["v1"] in cv_keys and sfu.CHECKPOINT_KEY_NAMES["clip"] in cv_keys

    tags = {key: np.float32(i) for i, key in enumerate(real)}
    states = {c: {} for c in COMPONENTS}
    for key, shape in real.items():
        c, k = key.split(".", 1)
        states[c][k] = np.broadcast_to(tags[key], shape)
    ckpt = diffusers_to_compvis(states, configs)
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ckpt, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(ckpt, configs["vae"]),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()
        },
    }
    got = {f"{c}.{k}": v for c in COMPONENTS for k, v in converted[c].items()}
    assert sorted(got) == sorted(real)
    for key, arr in got.items():
        assert arr.shape == real[key] and arr.flat[0] == tags[key], key


def test_known_extras_and_variants_are_accepted(tiny):
    _, states, configs = tiny
    ckpt = diffusers_to_compvis(states, configs)
    extras = {
        "betas": np.zeros(10),
        "alphas_cumprod": np.zeros(10),
        "model_ema.decay": np.zeros(()),
        "model_ema.diffusion_modelout2bias": np.zeros(4),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
    }
    # older files name the text encoder without the ``text_model.`` level
    bare = {k.replace("transformer.text_model.", "transformer."): v for k, v in ckpt.items()}
    for variant in ({**ckpt, **extras}, bare):
        back = compvis_to_diffusers(variant, configs)
        for c in COMPONENTS:
            _assert_same(back[c], states[c])


def test_text_prefix_and_legacy_vae_names_on_the_diffusers_side(tiny):
    _, states, configs = tiny
    want = diffusers_to_compvis(states, configs)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in states["vae"].items():
        for new, old in legacy_names.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # the oldest files: 1x1 conv weights
        legacy[k] = v
    assert any(".query.weight" in k for k in legacy)
    _assert_same(normalize_vae_keys(legacy), states["vae"])
    both = {
        **legacy,
        "encoder.mid_block.attentions.0.to_q.weight": states["vae"][
            "encoder.mid_block.attentions.0.to_q.weight"
        ],
    }
    with pytest.raises(WeightsError, match="encoder.mid_block.attentions.0.to_q.weight"):
        normalize_vae_keys(both)
    prefixed = {f"text_model.{k}": v for k, v in states["text_encoder"].items()}
    got = diffusers_to_compvis({**states, "vae": legacy, "text_encoder": prefixed}, configs)
    _assert_same(got, want)
    assert all(not k.startswith("cond_stage_model.") or ".transformer.text_model." in k for k in got)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (
            lambda d: d.update({"model.diffusion_model.extra.weight": np.zeros(1)}),
            "model.diffusion_model.extra.weight",
        ),
        (
            lambda d: d.pop("model.diffusion_model.out.2.bias"),
            "missing key 'model.diffusion_model.out.2.bias'",
        ),
        (
            lambda d: d.update({"first_stage_model.quant_conv.bias": np.zeros(3)}),
            "first_stage_model.quant_conv.bias",
        ),
        (  # ldm's VAE attention must be 1x1 conv weights
            lambda d: d.update({"first_stage_model.encoder.mid.attn_1.q.weight": np.zeros((64, 64))}),
            "first_stage_model.encoder.mid.attn_1.q.weight",
        ),
    ],
    ids=["unknown", "missing", "shape", "attn-shape"],
)
def test_compvis_errors_name_the_key(tiny, mutate, msg):
    _, states, configs = tiny
    ckpt = diffusers_to_compvis(states, configs)
    mutate(ckpt)
    with pytest.raises(WeightsError, match=msg.replace(".", r"\.")):
        compvis_to_diffusers(ckpt, configs)


@pytest.mark.parametrize(
    "comp, mutate, msg",
    [
        ("unet", lambda d: d.update({"bogus.weight": np.zeros(1)}), "unexpected key 'unet.bogus.weight'"),
        ("vae", lambda d: d.pop("decoder.conv_out.bias"), "missing key 'vae.decoder.conv_out.bias'"),
        (
            "text_encoder",
            lambda d: d.update({"final_layer_norm.bias": np.zeros(5)}),
            "text_encoder.final_layer_norm",
        ),
    ],
    ids=["unknown", "missing", "shape"],
)
def test_diffusers_errors_name_the_key(tiny, comp, mutate, msg):
    _, states, configs = tiny
    states = {**states, comp: dict(states[comp])}
    mutate(states[comp])
    with pytest.raises(WeightsError, match=msg.replace(".", r"\.")):
        diffusers_to_compvis(states, configs)


def test_unsupported_configs_raise(tiny):
    _, _, configs = tiny
    bad = {**configs["unet"], "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        compvis_key_map(bad, configs["vae"], configs["text_encoder"])
    with pytest.raises(ConfigError, match="class_embed_type"):
        compvis_key_map(
            {**configs["unet"], "class_embed_type": "timestep"}, configs["vae"], configs["text_encoder"]
        )


# --- convert/ckpt.py: pickled checkpoints, read without running code from them ---------------------------


def _write_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("pwned")


class _Payload:
    """A pickle that runs ``_write_marker`` when loaded by a full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_load_ckpt_reads_a_nested_state_dict(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.randn(2).half(), "c": torch.randn(5).bfloat16()}
    path = tmp_path / "model.ckpt"
    torch.save({"global_step": 1, "state_dict": sd}, path)
    got = load_ckpt(path)
    assert sorted(got) == sorted(sd)
    for k, t in sd.items():
        np.testing.assert_array_equal(got[k].astype(np.float32), t.float().numpy())
    assert got["b"].dtype == np.float16 and str(got["c"].dtype) == "bfloat16"
    main([str(path), str(tmp_path / "model.safetensors")])
    back = {k: v.float().numpy() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    for k in sd:
        np.testing.assert_array_equal(back[k], got[k].astype(np.float32))


def test_load_ckpt_accepts_the_lightning_callback_of_compvis_files(tmp_path, monkeypatch):
    """Real SD v1 .ckpt files pickle Lightning's ModelCheckpoint class as a key under ``callbacks``."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    for pkg in (
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        name,
    ):  # a stand-in package to pickle from
        monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = ModelCheckpoint
    path = tmp_path / "sd.ckpt"
    torch.save(
        {"callbacks": {ModelCheckpoint: {"best_model_score": None}}, "state_dict": {"w": torch.ones(2)}}, path
    )
    monkeypatch.undo()  # load with no such package importable
    np.testing.assert_array_equal(load_ckpt(path)["w"], np.ones(2, np.float32))


def test_load_ckpt_refuses_code_execution(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match="refusing to unpickle .*evil.ckpt.*arbitrary code execution") as e:
        load_ckpt(path)
    assert "\n" not in str(e.value) and "_write_marker" in str(e.value)
    assert not marker.exists()
    # the payload is live: a full unpickler does run it
    torch.load(path, weights_only=False)
    assert marker.exists()
    os.remove(marker)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Payload(str(marker)), f, protocol=2)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        load_ckpt(tmp_path / "evil.pkl")
    assert not marker.exists()


def _compvis_shapes(unet: dict, vae: dict, text: dict) -> dict:
    """CompVis key -> shape of a single file in these configs, without building any tensor."""
    from jax_erasepro.compvis import _rows, compvis_shape

    return {cv: compvis_shape(rule, shape) for cv, _, rule, shape in _rows(unet, vae, text)}


def test_architecture_inferred_from_shapes_is_sd14s(sd14_dir):
    """What a standard SD v1.4 file's shapes fix equals diffusers' own SD v1.4 configs, field by field."""
    from jax_erasepro.compvis import infer_configs

    cfg = {c: json.loads((sd14_dir / c / "config.json").read_text()) for c in COMPONENTS}
    defaults = {"use_linear_projection": False, "transformer_layers_per_block": 1}  # diffusers' when absent
    for comp, fields in infer_configs(_compvis_shapes(cfg["unet"], cfg["vae"], cfg["text_encoder"])).items():
        for key, value in fields.items():
            assert cfg[comp].get(key, defaults.get(key)) == value, (comp, key)


def test_inference_refuses_what_it_cannot_tell():
    """SD v2.x's UNet shapes give 64 channels per head; a text encoder in neither CLIP's nor OpenCLIP's
    layout, and an unknown context width, are one WeightsError each saying what is wrong."""
    from jax_erasepro.compvis import infer_configs

    v2_unet = dict(
        UNET_TINY,
        block_out_channels=(320, 640),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    shapes = _compvis_shapes(v2_unet, VAE_TINY, TEXT_TINY)
    unet = infer_configs(shapes)["unet"]
    assert unet["attention_head_dim"] == [5, 10] and unet["use_linear_projection"] is True
    unet_and_vae = {k: v for k, v in shapes.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(WeightsError, match="text encoder is in no layout we read.*OpenCLIP"):
        infer_configs({**unet_and_vae, "conditioner.embedders.0.transformer.x": (1,)})  # SDXL's
    with pytest.raises(WeightsError, match="cross-attention width 32.*config="):
        infer_configs(_compvis_shapes(UNET_TINY, VAE_TINY, TEXT_TINY))
    with pytest.raises(WeightsError, match="no tensor.*config="):
        infer_configs({"model.diffusion_model.out.2.weight": (4, 32, 3, 3)})


# --- SD v2.x: OpenCLIP's text tower (cond_stage_model.model.*, fused in_proj q/k/v) ----------------------

OPEN_CLIP = "cond_stage_model.model."
TEXT_GELU = dict(TEXT_TINY, hidden_act="gelu")  # a gelu text encoder is written in OpenCLIP's layout


@pytest.fixture(scope="module")
def tiny_v2():
    mods = {
        "unet": _randomize(UNet2DConditionModel(**UNET_TINY), 0),
        "vae": _randomize(AutoencoderKL(**VAE_TINY), 1),
        "text_encoder": _randomize(CLIPTextModel(CLIPTextConfig(**TEXT_GELU)), 2),
    }
    states = {k: _numpy(m) for k, m in mods.items()}
    configs = {k: (m.config.to_dict() if k == "text_encoder" else dict(m.config)) for k, m in mods.items()}
    return mods, states, configs


def test_open_clip_layout_round_trips_and_agrees_with_diffusers(tiny_v2):
    """q/k/v fuse into ``in_proj`` (q first) and split back bit-exactly; diffusers' own
    ``convert_open_clip_checkpoint`` reads our file to the same text encoder."""
    mods, states, configs = tiny_v2
    flat = diffusers_to_compvis(states, configs)
    text = {k: v for k, v in flat.items() if k.startswith("cond_stage_model.")}
    assert all(k.startswith(OPEN_CLIP) for k in text) and len(text) == 2 + 2 + 2 * 12
    te = states["text_encoder"]
    np.testing.assert_array_equal(
        text[f"{OPEN_CLIP}transformer.resblocks.1.attn.in_proj_weight"],
        np.concatenate([te[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]),
    )
    back = compvis_to_diffusers(flat, configs)
    for c in COMPONENTS:
        _assert_same(back[c], states[c])
    got = sfu.convert_open_clip_checkpoint(
        mods["text_encoder"], {k: torch.from_numpy(v) for k, v in text.items()}
    )
    _assert_same({k.removeprefix("text_model."): v.numpy() for k, v in got.items()}, te)


def test_open_clip_extras_are_ignored_and_a_second_extra_block_is_not(tiny_v2):
    """A standard SD v2.x file also holds the tower's last block (unused: SD conditions on the
    penultimate layer), ``text_projection`` and ``logit_scale``: ignored, as diffusers does. A block beyond
    that is not; a missing or mis-shaped fused tensor is named."""
    _, states, configs = tiny_v2
    flat = diffusers_to_compvis(states, configs)
    block = f"{OPEN_CLIP}transformer.resblocks."
    last = {k.replace(f"{block}0.", f"{block}2."): v for k, v in flat.items() if k.startswith(f"{block}0.")}
    h = TEXT_GELU["hidden_size"]
    extras = {
        f"{OPEN_CLIP}text_projection": np.ones((h, h), np.float32),
        f"{OPEN_CLIP}logit_scale": np.ones(()),
    }
    back = compvis_to_diffusers({**flat, **last, **extras}, configs)
    _assert_same(back["text_encoder"], states["text_encoder"])
    beyond = {k.replace(f"{block}2.", f"{block}3."): v for k, v in last.items()}
    with pytest.raises(WeightsError, match=r"unexpected key '.*resblocks\.3\."):
        compvis_to_diffusers({**flat, **last, **beyond}, configs)
    with pytest.raises(WeightsError, match=r"missing key '.*resblocks\.1\.attn\.in_proj_bias'"):
        compvis_to_diffusers(
            {k: v for k, v in flat.items() if not k.endswith("1.attn.in_proj_bias")}, configs
        )
    bad = dict(flat, **{f"{block}0.attn.in_proj_weight": np.zeros((2 * h, h), np.float32)})
    with pytest.raises(
        WeightsError, match=r"in_proj_weight' has shape \(64, 32\), the config expects \(96, 32\)"
    ):
        compvis_to_diffusers(bad, configs)


def test_diffusers_from_single_file_reads_our_sd2_checkpoint(tiny_v2, tmp_path, sd14_dir):
    mods, states, configs = tiny_v2
    pipe = StableDiffusionPipeline(
        vae=mods["vae"],
        text_encoder=mods["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(sd14_dir / "tokenizer"),
        unet=mods["unet"],
        scheduler=PNDMScheduler.from_pretrained(sd14_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "folder")
    path = tmp_path / "model.safetensors"
    save_file(diffusers_to_compvis(states, configs), str(path))
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tmp_path / "folder"), local_files_only=True, safety_checker=None
    )
    for c in COMPONENTS:
        _assert_same(_numpy(getattr(loaded, c)), states[c])


# stabilityai/stable-diffusion-2-1's configs, the fields a single file's tensors fix
SD21_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    in_channels=4,
    out_channels=4,
    transformer_layers_per_block=1,
)
SD21_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def test_sd21_architecture_inferred_from_a_standard_files_shapes():
    """A standard SD v2.1 file (24 OpenCLIP blocks, text_projection, logit_scale; shapes only, no tensor)
    gives SD v2.1's configs: 23 text layers, 16 heads, gelu; 64 channels per UNet head; its keys all map."""
    from jax_erasepro.compvis import infer_configs, plan_compvis_to_diffusers

    shapes = _compvis_shapes(SD21_UNET, SD21_VAE, SD21_TEXT)
    b22, b23 = f"{OPEN_CLIP}transformer.resblocks.22.", f"{OPEN_CLIP}transformer.resblocks.23."
    shapes.update({k.replace(b22, b23): v for k, v in shapes.items() if k.startswith(b22)})
    shapes.update({f"{OPEN_CLIP}text_projection": (1024, 1024), f"{OPEN_CLIP}logit_scale": ()})
    assert shapes[f"{b23}attn.in_proj_weight"] == (3072, 1024)
    inferred = infer_configs(shapes)
    assert inferred == {"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT}
    plan = plan_compvis_to_diffusers(shapes, inferred)
    assert len(plan["text_encoder"]) == 2 + 2 + 23 * 16
    assert plan["text_encoder"]["encoder.layers.22.self_attn.v_proj.weight"] == (
        f"{b22}attn.in_proj_weight",
        "fused_qkv.2",
        (3072, 1024),
    )
    # a file of ours holds just the 23 blocks the model has: taken whole
    ours = {k: v for k, v in shapes.items() if not k.startswith((b23, f"{OPEN_CLIP}text_projection"))}
    assert infer_configs(ours)["text_encoder"]["num_hidden_layers"] == 23
