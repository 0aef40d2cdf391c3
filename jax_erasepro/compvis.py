"""The one two-way table between single-file CompVis (ldm) SD v1.x/v2.x checkpoints and diffusers keys.

Generated from the three diffusers configs, so tiny test configs and SD v1.4 use the same code. Each
row is (CompVis key, component-prefixed diffusers key, layout rule); the rules are ``identity``,
``conv1x1_linear`` (ldm's VAE mid attention is 1x1 convs, diffusers' Linear: a reshape, exact) and
``fused_qkv.{0,1,2}`` (SD v2.x's OpenCLIP text encoder keeps q, k, v as one ``in_proj`` tensor: three rows
share its CompVis key, each one a third of it along dim 0, exact).
Both directions are strict: an unknown, missing, duplicate or mis-shaped tensor raises naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jax_erasepro.models.config import ConfigError
from jax_erasepro.weights import WeightsError

COMPONENTS = ("unet", "vae", "text_encoder")
IDENTITY, CONV1X1_LINEAR = "identity", "conv1x1_linear"
FUSED_QKV = ("fused_qkv.0", "fused_qkv.1", "fused_qkv.2")  # q, k, v: thirds of OpenCLIP's in_proj

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
_TEXT_BARE_PREFIX = "cond_stage_model.transformer."  # older files: no ``text_model.`` level
HF_TEXT_PREFIX = "text_model."  # transformers < 5 writes it; ours and transformers 5 do not
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD v2.x: OpenCLIP ViT-H/14's text tower (ldm's layout)
CLIP_LAYOUT, OPEN_CLIP_LAYOUT = "clip", "open_clip"
# OpenCLIP entries the SD text encoder has no use for: the CLIP-space projection and the logit scale.
OPEN_CLIP_UNUSED = frozenset({f"{OPEN_CLIP_PREFIX}text_projection", f"{OPEN_CLIP_PREFIX}logit_scale"})

# Non-weight entries of real single-file checkpoints: ldm's diffusion schedule buffers, the EMA copy
# (pruned files already hold EMA weights in ``model.*``), CLIP's position_ids buffer.
IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
    }
)
IGNORED_PREFIXES = ("model_ema.",)

# UNet config keys that add parameters the SD v1.x ldm layout has no place for: key -> accepted values.
_UNET_FIXED = {
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}
_VAE_FIXED = {"mid_block_add_attention": (True,), "use_quant_conv": (True,), "use_post_quant_conv": (True,)}

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_RE = re.compile(r"^(.*mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")

Row = tuple[str, str, str, tuple[int, ...]]  # compvis key, diffusers key, rule, diffusers shape


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, tuple[Any, ...]], name: str) -> None:
    for key, accepted in fixed.items():
        if key in cfg and cfg[key] not in accepted:
            raise ConfigError(f"{name} config: {key}={cfg[key]!r} has no SD v1.x CompVis layout")


def _param(cv: str, df: str, *shapes: tuple[int, ...], rule: str = IDENTITY) -> Iterator[Row]:
    """Rows for ``weight`` (and ``bias`` when a second shape is given) of one layer."""
    yield cv + ".weight", df + ".weight", rule, shapes[0]
    if len(shapes) > 1:
        yield cv + ".bias", df + ".bias", IDENTITY, shapes[1]


def _conv(cv: str, df: str, c_out: int, c_in: int, k: int) -> Iterator[Row]:
    return _param(cv, df, (c_out, c_in, k, k), (c_out,))


def _norm(cv: str, df: str, c: int) -> Iterator[Row]:
    return _param(cv, df, (c,), (c,))


def _resnet(
    cv: str, df: str, names: Mapping[str, str], c_in: int, c_out: int, temb: int | None
) -> Iterator[Row]:
    """A ResnetBlock2D; ``names`` maps ldm sub-layer names to diffusers ones."""
    d = {v: k for k, v in names.items()}
    yield from _norm(f"{cv}.{d['norm1']}", f"{df}.norm1", c_in)
    yield from _conv(f"{cv}.{d['conv1']}", f"{df}.conv1", c_out, c_in, 3)
    if temb is not None:
        yield from _param(f"{cv}.{d['time_emb_proj']}", f"{df}.time_emb_proj", (c_out, temb), (c_out,))
    yield from _norm(f"{cv}.{d['norm2']}", f"{df}.norm2", c_out)
    yield from _conv(f"{cv}.{d['conv2']}", f"{df}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv(f"{cv}.{d['conv_shortcut']}", f"{df}.conv_shortcut", c_out, c_in, 1)


def _transformer(cv: str, df: str, c: int, cross: int, depth: int, linear_proj: bool) -> Iterator[Row]:
    """A Transformer2DModel / ldm SpatialTransformer: the sub-keys are the same on both sides."""
    proj = (c, c) if linear_proj else (c, c, 1, 1)
    yield from _norm(f"{cv}.norm", f"{df}.norm", c)
    yield from _param(f"{cv}.proj_in", f"{df}.proj_in", proj, (c,))
    for t in range(depth):
        cb, db = f"{cv}.transformer_blocks.{t}", f"{df}.transformer_blocks.{t}"
        for attn, kv in (("attn1", c), ("attn2", cross)):
            yield from _param(f"{cb}.{attn}.to_q", f"{db}.{attn}.to_q", (c, c))
            yield from _param(f"{cb}.{attn}.to_k", f"{db}.{attn}.to_k", (c, kv))
            yield from _param(f"{cb}.{attn}.to_v", f"{db}.{attn}.to_v", (c, kv))
            yield from _param(f"{cb}.{attn}.to_out.0", f"{db}.{attn}.to_out.0", (c, c), (c,))
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{cb}.{n}", f"{db}.{n}", c)
        yield from _param(f"{cb}.ff.net.0.proj", f"{db}.ff.net.0.proj", (8 * c, c), (8 * c,))
        yield from _param(f"{cb}.ff.net.2", f"{db}.ff.net.2", (c, 4 * c), (c,))
    yield from _param(f"{cv}.proj_out", f"{df}.proj_out", proj, (c,))


def _unet_rows(cfg: Mapping[str, Any]) -> Iterator[Row]:
    """ldm UNetModel <-> UNet2DConditionModel: input_blocks / middle_block / output_blocks numbering."""
    _check_fixed(cfg, _UNET_FIXED, "unet")
    chans = list(cfg["block_out_channels"])
    lpb, n = cfg["layers_per_block"], len(chans)
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(lpb, int) or not isinstance(depth, int):
        raise ConfigError("unet config: layers_per_block and transformer_layers_per_block must be integers")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ConfigError("unet config: down_block_types / up_block_types must match block_out_channels")
    for t in down + up:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise ConfigError(f"unet config: block type {t!r} has no SD v1.x CompVis layout")
    temb = cfg.get("time_embedding_dim") or 4 * chans[0]
    cross, lin = cfg["cross_attention_dim"], cfg.get("use_linear_projection", False)
    p = UNET_PREFIX

    yield from _param(f"{p}time_embed.0", "time_embedding.linear_1", (temb, chans[0]), (temb,))
    yield from _param(f"{p}time_embed.2", "time_embedding.linear_2", (temb, temb), (temb,))
    yield from _conv(f"{p}input_blocks.0.0", "conv_in", chans[0], cfg.get("in_channels", 4), 3)
    c_prev = chans[0]
    for b, c in enumerate(chans):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            yield from _resnet(
                f"{p}input_blocks.{i}.0",
                f"down_blocks.{b}.resnets.{j}",
                _UNET_RESNET,
                c_prev if j == 0 else c,
                c,
                temb,
            )
            if down[b] == "CrossAttnDownBlock2D":
                yield from _transformer(
                    f"{p}input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", c, cross, depth, lin
                )
        if b < n - 1:
            i = 1 + b * (lpb + 1) + lpb
            yield from _conv(f"{p}input_blocks.{i}.0.op", f"down_blocks.{b}.downsamplers.0.conv", c, c, 3)
        c_prev = c
    c = chans[-1]
    yield from _resnet(f"{p}middle_block.0", "mid_block.resnets.0", _UNET_RESNET, c, c, temb)
    yield from _transformer(f"{p}middle_block.1", "mid_block.attentions.0", c, cross, depth, lin)
    yield from _resnet(f"{p}middle_block.2", "mid_block.resnets.1", _UNET_RESNET, c, c, temb)
    rev = chans[::-1]
    for b, c in enumerate(rev):
        c_prev, c_skip_last = rev[max(b - 1, 0)], rev[min(b + 1, n - 1)]
        attn = up[b] == "CrossAttnUpBlock2D"
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            c_in = (c_prev if j == 0 else c) + (c_skip_last if j == lpb else c)
            yield from _resnet(
                f"{p}output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", _UNET_RESNET, c_in, c, temb
            )
            if attn:
                yield from _transformer(
                    f"{p}output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", c, cross, depth, lin
                )
        if b < n - 1:
            i = b * (lpb + 1) + lpb
            yield from _conv(
                f"{p}output_blocks.{i}.{2 if attn else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv", c, c, 3
            )
    yield from _norm(f"{p}out.0", "conv_norm_out", chans[0])
    yield from _conv(f"{p}out.2", "conv_out", cfg.get("out_channels", 4), chans[0], 3)


def _vae_mid(cv: str, df: str, c: int) -> Iterator[Row]:
    yield from _resnet(f"{cv}.block_1", f"{df}.resnets.0", _VAE_RESNET, c, c, None)
    for ldm, hf in _VAE_ATTN.items():
        if ldm == "norm":
            yield from _norm(f"{cv}.attn_1.norm", f"{df}.attentions.0.group_norm", c)
        else:
            yield from _param(
                f"{cv}.attn_1.{ldm}", f"{df}.attentions.0.{hf}", (c, c), (c,), rule=CONV1X1_LINEAR
            )
    yield from _resnet(f"{cv}.block_2", f"{df}.resnets.1", _VAE_RESNET, c, c, None)


def _vae_rows(cfg: Mapping[str, Any]) -> Iterator[Row]:
    """ldm AutoencoderKL (encoder.down.{i}.block.{j}, mid.block_1/attn_1/block_2) <-> diffusers'."""
    _check_fixed(cfg, _VAE_FIXED, "vae")
    chans, lpb = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    n, lat, p = len(chans), cfg.get("latent_channels", 4), VAE_PREFIX
    for t in list(cfg["down_block_types"]) + list(cfg["up_block_types"]):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise ConfigError(f"vae config: block type {t!r} has no SD v1.x CompVis layout")

    yield from _conv(f"{p}encoder.conv_in", "encoder.conv_in", chans[0], cfg.get("in_channels", 3), 3)
    c_prev = chans[0]
    for b, c in enumerate(chans):
        for j in range(lpb):
            yield from _resnet(
                f"{p}encoder.down.{b}.block.{j}",
                f"encoder.down_blocks.{b}.resnets.{j}",
                _VAE_RESNET,
                c_prev if j == 0 else c,
                c,
                None,
            )
        if b < n - 1:
            yield from _conv(
                f"{p}encoder.down.{b}.downsample.conv",
                f"encoder.down_blocks.{b}.downsamplers.0.conv",
                c,
                c,
                3,
            )
        c_prev = c
    yield from _vae_mid(f"{p}encoder.mid", "encoder.mid_block", chans[-1])
    yield from _norm(f"{p}encoder.norm_out", "encoder.conv_norm_out", chans[-1])
    yield from _conv(f"{p}encoder.conv_out", "encoder.conv_out", 2 * lat, chans[-1], 3)
    yield from _conv(f"{p}quant_conv", "quant_conv", 2 * lat, 2 * lat, 1)
    yield from _conv(f"{p}post_quant_conv", "post_quant_conv", lat, lat, 1)
    yield from _conv(f"{p}decoder.conv_in", "decoder.conv_in", chans[-1], lat, 3)
    yield from _vae_mid(f"{p}decoder.mid", "decoder.mid_block", chans[-1])
    rev = chans[::-1]
    for b, c in enumerate(rev):
        ldm_b, c_prev = n - 1 - b, rev[max(b - 1, 0)]
        for j in range(lpb + 1):
            yield from _resnet(
                f"{p}decoder.up.{ldm_b}.block.{j}",
                f"decoder.up_blocks.{b}.resnets.{j}",
                _VAE_RESNET,
                c_prev if j == 0 else c,
                c,
                None,
            )
        if b < n - 1:
            yield from _conv(
                f"{p}decoder.up.{ldm_b}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv", c, c, 3
            )
    yield from _norm(f"{p}decoder.norm_out", "decoder.conv_norm_out", chans[0])
    yield from _conv(f"{p}decoder.conv_out", "decoder.conv_out", cfg.get("out_channels", 3), chans[0], 3)


def text_layout(text_cfg: Mapping[str, Any]) -> str:
    """The single-file layout a text encoder is written in: OpenCLIP's (SD v2.x) for a ``gelu`` one, CLIP's
    (SD v1.x, ``quick_gelu``) otherwise; so a reader without configs (ours, ldm's yaml) gets the activation
    right from the keys alone."""
    return OPEN_CLIP_LAYOUT if text_cfg.get("hidden_act", "quick_gelu") == "gelu" else CLIP_LAYOUT


def _text_rows(cfg: Mapping[str, Any]) -> Iterator[Row]:
    """CLIP text model: the CompVis key is the transformers key under ``cond_stage_model.transformer.``."""
    h, f, p = cfg["hidden_size"], cfg["intermediate_size"], TEXT_PREFIX
    yield from _param(f"{p}embeddings.token_embedding", "embeddings.token_embedding", (cfg["vocab_size"], h))
    yield from _param(
        f"{p}embeddings.position_embedding",
        "embeddings.position_embedding",
        (cfg["max_position_embeddings"], h),
    )
    for i in range(cfg["num_hidden_layers"]):
        layer = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _param(f"{p}{layer}.self_attn.{proj}", f"{layer}.self_attn.{proj}", (h, h), (h,))
        yield from _norm(f"{p}{layer}.layer_norm1", f"{layer}.layer_norm1", h)
        yield from _param(f"{p}{layer}.mlp.fc1", f"{layer}.mlp.fc1", (f, h), (f,))
        yield from _param(f"{p}{layer}.mlp.fc2", f"{layer}.mlp.fc2", (h, f), (h,))
        yield from _norm(f"{p}{layer}.layer_norm2", f"{layer}.layer_norm2", h)
    yield from _norm(f"{p}final_layer_norm", "final_layer_norm", h)


def _open_clip_rows(cfg: Mapping[str, Any]) -> Iterator[Row]:
    """OpenCLIP's text tower (ldm's FrozenOpenCLIPEmbedder) <-> transformers' CLIPTextModel, as diffusers'
    ``convert_open_clip_checkpoint``: ``resblocks.N`` is ``encoder.layers.N``, its fused ``in_proj`` q/k/v."""
    h, f, p = cfg["hidden_size"], cfg["intermediate_size"], OPEN_CLIP_PREFIX
    yield f"{p}token_embedding.weight", "embeddings.token_embedding.weight", IDENTITY, (cfg["vocab_size"], h)
    yield (
        f"{p}positional_embedding",
        "embeddings.position_embedding.weight",
        IDENTITY,
        (
            cfg["max_position_embeddings"],
            h,
        ),
    )
    for i in range(cfg["num_hidden_layers"]):
        block, layer = f"{p}transformer.resblocks.{i}", f"encoder.layers.{i}"
        for rule, proj in zip(FUSED_QKV, ("q_proj", "k_proj", "v_proj"), strict=True):
            yield f"{block}.attn.in_proj_weight", f"{layer}.self_attn.{proj}.weight", rule, (h, h)
            yield f"{block}.attn.in_proj_bias", f"{layer}.self_attn.{proj}.bias", rule, (h,)
        yield from _param(f"{block}.attn.out_proj", f"{layer}.self_attn.out_proj", (h, h), (h,))
        yield from _norm(f"{block}.ln_1", f"{layer}.layer_norm1", h)
        yield from _param(f"{block}.mlp.c_fc", f"{layer}.mlp.fc1", (f, h), (f,))
        yield from _param(f"{block}.mlp.c_proj", f"{layer}.mlp.fc2", (h, f), (h,))
        yield from _norm(f"{block}.ln_2", f"{layer}.layer_norm2", h)
    yield from _norm(f"{p}ln_final", "final_layer_norm", h)


def _rows(
    unet_cfg: Mapping[str, Any],
    vae_cfg: Mapping[str, Any],
    text_cfg: Mapping[str, Any],
    layout: str | None = None,
) -> list[Row]:
    """The whole table; the text encoder's rows in ``layout`` (default: ``text_layout(text_cfg)``)."""
    layout = layout or text_layout(text_cfg)
    text = _open_clip_rows(text_cfg) if layout == OPEN_CLIP_LAYOUT else _text_rows(text_cfg)
    rows = []
    for comp, gen in (("unet", _unet_rows(unet_cfg)), ("vae", _vae_rows(vae_cfg)), ("text_encoder", text)):
        rows += [(cv, f"{comp}.{df}", rule, shape) for cv, df, rule, shape in gen]
    return rows


def compvis_key_map(
    unet_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any]
) -> list[tuple[str, str, str]]:
    """The table: (CompVis key, ``unet.``/``vae.``/``text_encoder.``-prefixed diffusers key, layout rule).
    One-to-one but for OpenCLIP's fused q/k/v: three rows (rules ``FUSED_QKV``) share one CompVis key."""
    return [(cv, df, rule) for cv, df, rule, _ in _rows(unet_cfg, vae_cfg, text_cfg)]


def diffusers_shapes(
    unet_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Prefixed diffusers key -> the shape the configs imply (what both directions check against)."""
    return {df: shape for _, df, _, shape in _rows(unet_cfg, vae_cfg, text_cfg)}


def compvis_shape(rule: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The CompVis shape of a tensor whose diffusers shape is ``shape``."""
    if rule == CONV1X1_LINEAR:
        return (*shape, 1, 1)
    if rule in FUSED_QKV:
        return (3 * shape[0], *shape[1:])
    return shape


def compvis_entries(
    unet_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any]
) -> list[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """What a writer needs, one entry per CompVis tensor: (CompVis key, its diffusers keys in order (q, k, v
    for a fused one), the first key's rule, CompVis shape). Feed the arrays to ``to_compvis_tensor``."""
    groups: dict[str, tuple[list[str], str, tuple[int, ...]]] = {}
    for cv, df, rule, shape in _rows(unet_cfg, vae_cfg, text_cfg):
        groups.setdefault(cv, ([], rule, compvis_shape(rule, shape)))[0].append(df)
    return [(cv, tuple(dfs), rule, shape) for cv, (dfs, rule, shape) in groups.items()]


def to_compvis_tensor(rule: str, parts: list[np.ndarray]) -> np.ndarray:
    """One CompVis tensor from its diffusers arrays (``compvis_entries`` order): q, k, v concatenated for
    OpenCLIP's ``in_proj``, else the one array in CompVis layout."""
    if rule in FUSED_QKV:
        return np.concatenate([np.asarray(a) for a in parts], axis=0)
    (arr,) = parts
    return to_compvis_layout(rule, np.asarray(arr))


def _to_diffusers(rule: str, arr: np.ndarray) -> np.ndarray:
    if rule in FUSED_QKV:
        n = arr.shape[0] // 3
        i = FUSED_QKV.index(rule)
        return arr[i * n : (i + 1) * n]
    return arr.reshape(arr.shape[:2]) if rule == CONV1X1_LINEAR else arr


def to_compvis_layout(rule: str, arr: np.ndarray) -> np.ndarray:
    """A diffusers-layout tensor in CompVis layout (``rule`` from ``compvis_key_map``; not a fused part)."""
    return arr.reshape(*arr.shape, 1, 1) if rule == CONV1X1_LINEAR else arr


def _table(configs: Mapping[str, Mapping[str, Any]], layout: str | None = None) -> list[Row]:
    missing = [c for c in COMPONENTS if c not in configs]
    if missing:
        raise ConfigError(f"configs: missing the {missing[0]!r} config (need {', '.join(COMPONENTS)})")
    return _rows(configs["unet"], configs["vae"], configs["text_encoder"], layout)


def is_ignored(key: str) -> bool:
    """Whether a single-file checkpoint key is a known non-weight entry (schedule buffers, EMA, ids)."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _unused_open_clip(key: str, layers: int) -> bool:
    """OpenCLIP entries SD's text encoder does not use: the projection, the logit scale, and the tower's last
    block (``resblocks.{layers}``): SD v2.x conditions on the penultimate layer, so its 24-block file feeds a
    23-layer text encoder and diffusers ignores ``resblocks.23.*`` (``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``)."""
    return key in OPEN_CLIP_UNUSED or key.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers}.")


def _canonical_compvis(key: str) -> str:
    """Older files name the text encoder ``cond_stage_model.transformer.<key>``; add ``text_model.``."""
    if key.startswith(_TEXT_BARE_PREFIX) and not key.startswith(TEXT_PREFIX):
        return TEXT_PREFIX + key[len(_TEXT_BARE_PREFIX) :]
    return key


def _raise_missing(missing: set[str], source: str) -> None:
    if missing:
        first = sorted(missing)[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing key {first!r}{more}")


def file_text_layout(keys: Iterable[str]) -> str:
    """The text encoder layout of a single file's keys: OpenCLIP's when any key is under its prefix."""
    return OPEN_CLIP_LAYOUT if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) else CLIP_LAYOUT


def plan_compvis_to_diffusers(
    keys: Iterable[str], configs: Mapping[str, Mapping[str, Any]], *, source: str = "checkpoint"
) -> dict[str, dict[str, tuple[str, str, tuple[int, ...]]]]:
    """Check a single file's key set against the table, reading no tensor (so a loader can stream).

    The text encoder may be in either layout (CLIP's or OpenCLIP's, from the keys) whatever its config.
    Returns component -> diffusers key -> (file key, layout rule, CompVis shape); raises WeightsError on
    an unexpected, duplicate or missing key. Feed each tensor through ``compvis_tensor_to_diffusers``.
    """
    keys = list(keys)
    layout = file_text_layout(keys)
    layers = configs.get("text_encoder", {}).get("num_hidden_layers", 0)
    by_cv: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for cv, df, rule, shape in _table(configs, layout):
        by_cv.setdefault(cv, []).append((df, rule, shape))
    out: dict[str, dict[str, tuple[str, str, tuple[int, ...]]]] = {c: {} for c in COMPONENTS}
    seen: dict[str, str] = {}
    for key in keys:
        if is_ignored(key) or (layout == OPEN_CLIP_LAYOUT and _unused_open_clip(key, layers)):
            continue
        cv = _canonical_compvis(key)
        if cv not in by_cv:
            raise WeightsError(f"{source}: unexpected key {key!r}")
        if cv in seen:
            raise WeightsError(f"{source}: key {key!r} duplicates {seen[cv]!r}")
        seen[cv] = key
        for df, rule, shape in by_cv[cv]:
            comp, name = df.split(".", 1)
            out[comp][name] = (key, rule, compvis_shape(rule, shape))
    _raise_missing(set(by_cv) - set(seen), source)
    return out


def compvis_tensor_to_diffusers(
    arr: Any, entry: tuple[str, str, tuple[int, ...]], *, source: str = "checkpoint"
) -> Any:
    """One planned tensor (``plan_compvis_to_diffusers`` entry) in diffusers layout, its shape checked. A
    tensor not read yet (anything with ``shape`` and ``read_into``) stays unread where the layout is equal,
    and so does a third of a fused q/k/v when it can give its rows unread (``row_slice``)."""
    key, rule, want = entry
    if tuple(arr.shape) != want:
        raise WeightsError(f"{source}: key {key!r} has shape {tuple(arr.shape)}, the config expects {want}")
    if rule == IDENTITY and hasattr(arr, "read_into"):
        return arr
    if rule in FUSED_QKV and hasattr(arr, "row_slice"):
        n = want[0] // 3
        i = FUSED_QKV.index(rule)
        return arr.row_slice(i * n, (i + 1) * n)
    return _to_diffusers(rule, np.asarray(arr))


# --- the architecture of a single file without configs, from its tensor shapes ----------------------------

SD1_CONTEXT, SD2_CONTEXT = 768, 1024  # CLIP ViT-L/14 (SD v1.x) and OpenCLIP ViT-H/14 (SD v2.x) text widths
SD1_HEADS = 8  # ldm's v1-inference.yaml: num_heads 8 in every block
SD2_HEAD_CHANNELS = 64  # v2-inference.yaml: num_head_channels 64, so heads = channels / 64
CLIP_HEAD_CHANNELS = 64  # CLIP text towers: heads = width / 64
SD2_OPEN_CLIP_BLOCKS = 24  # OpenCLIP ViT-H/14's text tower, all of which a standard SD v2.x file holds


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """How many consecutive ``prefix{i}.`` children exist from 0."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in shapes):
        n += 1
    return n


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(
            f"{source}: no tensor {key!r}, so its architecture cannot be read from its shapes "
            "(not an SD v1.x single file?); pass config=<a diffusers folder with its configs>"
        )
    return shapes[key]


def _infer_unet(s: Mapping[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    p = UNET_PREFIX
    in_channels = _shape(s, f"{p}input_blocks.0.0.weight", source)[1]
    n_inputs = _count(s, f"{p}input_blocks.")
    downs = [i for i in range(n_inputs) if f"{p}input_blocks.{i}.0.op.weight" in s]
    lpb = downs[0] - 1 if downs else n_inputs - 1
    levels = len(downs) + 1
    if lpb < 1 or n_inputs != 1 + levels * lpb + len(downs):
        raise WeightsError(f"{source}: its {n_inputs} input_blocks do not form an SD UNet's levels")
    chans, down_types, up_types = [], [], []
    for b in range(levels):
        i = 1 + b * (lpb + 1)
        chans.append(_shape(s, f"{p}input_blocks.{i}.0.out_layers.3.weight", source)[0])
        down_attn = f"{p}input_blocks.{i}.1.proj_in.weight" in s
        down_types.append("CrossAttnDownBlock2D" if down_attn else "DownBlock2D")
        up_attn = f"{p}output_blocks.{b * (lpb + 1)}.1.proj_in.weight" in s
        up_types.append("CrossAttnUpBlock2D" if up_attn else "UpBlock2D")
    mid = f"{p}middle_block.1"
    cross = _shape(s, f"{mid}.transformer_blocks.0.attn2.to_k.weight", source)[1]
    if cross == SD1_CONTEXT:
        heads: int | list[int] = SD1_HEADS
    elif cross == SD2_CONTEXT:
        heads = [c // SD2_HEAD_CHANNELS for c in chans]
    else:
        raise WeightsError(
            f"{source}: cross-attention width {cross} is neither SD v1.x's 768 nor SD v2.x's 1024, so its "
            "attention heads cannot be inferred; pass config=<a diffusers folder with its configs>"
        )
    return {
        "in_channels": in_channels,
        "out_channels": _shape(s, f"{p}out.2.weight", source)[0],
        "block_out_channels": chans,
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "use_linear_projection": len(_shape(s, f"{mid}.proj_in.weight", source)) == 2,
        "transformer_layers_per_block": _count(s, f"{mid}.transformer_blocks."),
    }


def _infer_vae(s: Mapping[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    p = VAE_PREFIX
    levels = _count(s, f"{p}encoder.down.")
    chans = [_shape(s, f"{p}encoder.down.{b}.block.0.conv2.weight", source)[0] for b in range(levels)]
    return {
        "in_channels": _shape(s, f"{p}encoder.conv_in.weight", source)[1],
        "out_channels": _shape(s, f"{p}decoder.conv_out.weight", source)[0],
        "latent_channels": _shape(s, f"{p}post_quant_conv.weight", source)[0],
        "block_out_channels": chans,
        "layers_per_block": _count(s, f"{p}encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _infer_clip_text(s: Mapping[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    p = TEXT_PREFIX
    vocab, hidden = _shape(s, f"{p}embeddings.token_embedding.weight", source)
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": _shape(s, f"{p}embeddings.position_embedding.weight", source)[0],
        "num_hidden_layers": _count(s, f"{p}encoder.layers."),
        "intermediate_size": _shape(s, f"{p}encoder.layers.0.mlp.fc1.weight", source)[0],
        "num_attention_heads": max(1, hidden // CLIP_HEAD_CHANNELS),
        "hidden_act": "quick_gelu",
    }


def _infer_open_clip_text(s: Mapping[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """SD v2.x's text encoder: OpenCLIP's tower up to its penultimate block. A standard file's 24 blocks give
    23 layers (diffusers ignores ``resblocks.23``); any other count (a file of ours, 23) is taken whole."""
    p = OPEN_CLIP_PREFIX
    vocab, hidden = _shape(s, f"{p}token_embedding.weight", source)
    blocks = _count(s, f"{p}transformer.resblocks.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": _shape(s, f"{p}positional_embedding", source)[0],
        "num_hidden_layers": blocks - 1 if blocks == SD2_OPEN_CLIP_BLOCKS else blocks,
        "intermediate_size": _shape(s, f"{p}transformer.resblocks.0.mlp.c_fc.weight", source)[0],
        "num_attention_heads": max(1, hidden // CLIP_HEAD_CHANNELS),
        "hidden_act": "gelu",
    }


def infer_configs(shapes: Mapping[str, tuple[int, ...]], *, source: str = "checkpoint") -> dict[str, dict]:
    """The ``unet``/``vae``/``text_encoder`` config fields that an SD v1.x or v2.x single file's tensors fix,
    inferred as diffusers' ``single_file_utils`` does (widths, levels, layers, block kinds, linear projection;
    heads from the context width: 768 -> 8 heads, 1024 -> 64 channels per head; the text encoder's layout
    fixes its activation: CLIP's ``quick_gelu``, OpenCLIP's ``gelu``). What shapes cannot tell (norm groups,
    scaling factor, prediction type) is left to the caller's defaults."""
    s = {_canonical_compvis(k): tuple(v) for k, v in shapes.items() if not is_ignored(k)}
    unet, vae = _infer_unet(s, source), _infer_vae(s, source)
    if f"{OPEN_CLIP_PREFIX}token_embedding.weight" in s:
        text = _infer_open_clip_text(s, source)
    elif f"{TEXT_PREFIX}embeddings.token_embedding.weight" in s:
        text = _infer_clip_text(s, source)
    else:
        raise WeightsError(
            f"{source}: its text encoder is in no layout we read (neither CLIP's {TEXT_PREFIX}* nor "
            f"OpenCLIP's {OPEN_CLIP_PREFIX}*: not an SD v1.x/v2.x single file?)"
        )
    return {"unet": unet, "vae": vae, "text_encoder": text}


def compvis_to_diffusers(
    tensors: Mapping[str, np.ndarray], configs: Mapping[str, Mapping[str, Any]], *, source: str = "checkpoint"
) -> dict[str, dict[str, np.ndarray]]:
    """Split a single-file CompVis state dict into diffusers ``unet``/``vae``/``text_encoder`` dicts.

    ``configs`` maps those component names to their diffusers config dicts. Text encoder keys come out
    without the ``text_model.`` prefix (transformers 5 and our models). Strict: raises WeightsError.
    """
    plan = plan_compvis_to_diffusers(tensors.keys(), configs, source=source)
    return {
        comp: {df: compvis_tensor_to_diffusers(tensors[e[0]], e, source=source) for df, e in rows.items()}
        for comp, rows in plan.items()
    }


def normalize_vae_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename legacy diffusers VAE attention keys (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0.

    Old files may also hold those weights as 1x1 convs (C, C, 1, 1); they become Linear (C, C), exactly.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = _LEGACY_VAE_RE.match(key)
        arr = np.asarray(value)
        if m:
            key = f"{m[1]}{_LEGACY_VAE_ATTN[m[2]]}.{m[3]}"
            if arr.ndim == 4 and arr.shape[2:] == (1, 1):
                arr = arr.reshape(arr.shape[:2])
        if key in out:
            raise WeightsError(f"vae: key {key!r} is present in both legacy and current form")
        out[key] = arr
    return out


def _normalize_text_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the ``text_model.`` prefix when every key carries it, and the position_ids buffer."""
    strip = bool(state) and all(k.startswith(HF_TEXT_PREFIX) for k in state)
    out = {k[len(HF_TEXT_PREFIX) :] if strip else k: v for k, v in state.items()}
    out.pop("embeddings.position_ids", None)
    return out


def diffusers_to_compvis(
    components: Mapping[str, Mapping[str, np.ndarray]],
    configs: Mapping[str, Mapping[str, Any]],
    *,
    source: str = "diffusers model",
) -> dict[str, np.ndarray]:
    """Merge diffusers ``unet``/``vae``/``text_encoder`` state dicts into one CompVis single-file dict.

    Accepts legacy VAE attention names and text encoder keys with or without ``text_model.``; writes
    the standard text encoder layout ``text_layout`` picks: ``cond_stage_model.transformer.text_model.*``
    (SD v1.x) or OpenCLIP's ``cond_stage_model.model.*`` (SD v2.x; the config's layers only, see
    ``_unused_open_clip``). Strict: raises WeightsError.
    """
    flat: dict[str, np.ndarray] = {}
    for comp in COMPONENTS:
        if comp not in components:
            raise WeightsError(f"{source}: missing component {comp!r}")
        state = components[comp]
        if comp == "vae":
            state = normalize_vae_keys(state)
        elif comp == "text_encoder":
            state = _normalize_text_keys(state)
        flat.update({f"{comp}.{k}": v for k, v in state.items()})
    table = _table(configs)
    unexpected = sorted(flat.keys() - {df for _, df, _, _ in table})
    if unexpected:
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r}")
    _raise_missing({df for _, df, _, _ in table} - flat.keys(), source)
    shapes = {df: shape for _, df, _, shape in table}
    for df, shape in shapes.items():
        if (got := np.shape(flat[df])) != shape:
            raise WeightsError(f"{source}: key {df!r} has shape {got}, the config expects {shape}")
    entries = compvis_entries(configs["unet"], configs["vae"], configs["text_encoder"])
    return {cv: to_compvis_tensor(rule, [flat[df] for df in dfs]) for cv, dfs, rule, _ in entries}
