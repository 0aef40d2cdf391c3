"""CLIP (text, vision, and the two joined) in Flax NNX, keyed like transformers 5's CLIP modules.

The identical encoder layers are stacked on a leading axis (built with ``nnx.vmap``, run with one
``lax.scan``), so compile time does not grow with depth; ``weights.py`` unstacks them on disk as
``encoder.layers.{i}.*``. Layer-wise solvers take one layer out with ``CLIPEncoder.layer(i)``, run it
(``CLIPEncoderLayer.__call__``, ``attn_input``) and put an edited copy back with ``set_layer``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from jax_erasepro.models.attention import multi_head_attention
from jax_erasepro.models.config import ConfigError, JsonConfig

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
}
# Training-only settings and metadata that transformers writes into CLIP configs.
_CLIP_IGNORED = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "dropout",
        "attention_dropout", "initializer_range", "initializer_factor", "projection_dim",
        "bos_token_id", "pad_token_id",
    }
)


def _validate_encoder(cfg: CLIPTextConfig | CLIPVisionConfig, source: str) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: unsupported value hidden_act={cfg.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"{source}: hidden_size={cfg.hidden_size} is not a multiple of "
            f"num_attention_heads={cfg.num_attention_heads}"
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(JsonConfig):
    """transformers' ``CLIPTextConfig`` (SD's ``text_encoder/config.json``); defaults are transformers'."""

    IGNORED: ClassVar[frozenset[str]] = _CLIP_IGNORED

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 2 (SD v1.x's legacy value) pools at argmax(input_ids); any other id pools at its first occurrence
    eos_token_id: int = 49407

    def validate(self, source: str) -> None:
        _validate_encoder(self, source)
        if not isinstance(self.eos_token_id, int):
            raise ConfigError(f"{source}: unsupported value eos_token_id={self.eos_token_id!r} (one int)")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(JsonConfig):
    """transformers' ``CLIPVisionConfig``; square images and patches only (ints, as CLIP uses)."""

    IGNORED: ClassVar[frozenset[str]] = _CLIP_IGNORED

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self, source: str) -> None:
        _validate_encoder(self, source)
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(self, key), int):
                raise ConfigError(f"{source}: unsupported value {key}={getattr(self, key)!r} (one int)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{source}: image_size={self.image_size} is not a multiple of patch_size")


@dataclasses.dataclass(frozen=True)
class CLIPConfig(JsonConfig):
    """transformers' ``CLIPConfig``: a text and a vision config (nested JSON objects) and the projection."""

    IGNORED: ClassVar[frozenset[str]] = _CLIP_IGNORED - {"projection_dim"}

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> Self:
        d = dict(d)
        subs = {
            "text_config": CLIPTextConfig.from_dict(d.pop("text_config", {}), source=f"{source}:text_config"),
            "vision_config": CLIPVisionConfig.from_dict(
                d.pop("vision_config", {}), source=f"{source}:vision_config"
            ),
        }
        return dataclasses.replace(super().from_dict(d, source=source), **subs)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }


class CLIPAttention(nnx.Module):
    """Multi-head self-attention (``q/k/v/out_proj``), causal for the text tower."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.causal = causal
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (p(x) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(multi_head_attention(q, k, v, self.num_heads, causal=self.causal))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.act = config.hidden_act
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def _layer_norm(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance: CLIP's residual stream has large outlier channels
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)


class CLIPEncoderLayer(nnx.Module):
    """One pre-LN transformer block: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, causal=causal, rngs=rngs)
        self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(config, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    def attn_input(self, h: jax.Array) -> jax.Array:
        """The input shared by ``q_proj``/``k_proj``/``v_proj``: ``layer_norm1(h)``."""
        return self.layer_norm1(h)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.self_attn(self.attn_input(h))
        return h + self.mlp(self.layer_norm2(h))


class CLIPEncoder(nnx.Module):
    """``num_hidden_layers`` identical layers held as ONE stacked module (leading axis L on every param)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, rngs: nnx.Rngs):
        @nnx.vmap(in_axes=0)
        def make(key: jax.Array) -> CLIPEncoderLayer:
            return CLIPEncoderLayer(config, causal=causal, rngs=nnx.Rngs(key))

        self.layers = make(jax.random.split(rngs.params(), config.num_hidden_layers))
        # lax.scan's unroll: 1 keeps compile time flat in depth; training sets num_hidden_layers, which lets
        # XLA fuse across layers and drop the loop's dynamic slices (~25% faster steps on CPU).
        self.unroll = 1

    def __call__(
        self, h: jax.Array, *, output_hidden_states: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """All layers in one scan; with ``output_hidden_states`` also the (L+1, ...) states, input first."""
        graphdef, params = nnx.split(self.layers)

        def step(h: jax.Array, layer_params: nnx.State) -> tuple[jax.Array, jax.Array | None]:
            h = nnx.merge(graphdef, layer_params)(h)
            return h, h if output_hidden_states else None

        out, states = jax.lax.scan(step, h, params, unroll=self.unroll)
        if output_hidden_states:
            states = jnp.concatenate([h[None], states])
        return out, states

    def layer(self, i: int) -> CLIPEncoderLayer:
        """Layer ``i`` as a plain (unstacked) module holding copies of its params."""
        graphdef, params = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], params))

    def set_layer(self, i: int, layer: CLIPEncoderLayer) -> None:
        """Write an (edited) unstacked layer back into slot ``i`` of the stack, in place."""
        stacked = nnx.state(self.layers)
        nnx.update(self.layers, jax.tree.map(lambda s, x: s.at[i].set(x), stacked, nnx.state(layer)))


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, embedding_init=init, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t, max_t = input_ids.shape[-1], self.position_embedding.num_embeddings
        if t > max_t:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings={max_t}")
        return self.token_embedding(input_ids) + self.position_embedding.embedding[:t]


class CLIPTextModel(nnx.Module):
    """transformers' ``CLIPTextModel`` (keys without a ``text_model.`` prefix): SD v1.x's text encoder."""

    STACKED = ("encoder.layers",)

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, causal=True, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    def __call__(
        self, input_ids: jax.Array, *, output_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """(B, T) ids -> final-layer-normed (B, T, d) states (what SD feeds the UNet).

        With ``output_hidden_states`` also returns transformers' ``hidden_states`` stacked as (L+1, B, T, d):
        the embeddings first, each layer's output after (the last one before ``final_layer_norm``).
        """
        h, states = self.encoder(self.embeddings(input_ids), output_hidden_states=output_hidden_states)
        last = self.final_layer_norm(h)
        return (last, states) if output_hidden_states else last

    def pooled(self, last_hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
        """(B, d) states at each prompt's EOS token, chosen exactly as transformers does."""
        if self.config.eos_token_id == 2:  # legacy configs (SD v1.x): EOS has the largest id
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden, pos[:, None, None], axis=1)[:, 0]


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (d,)))
        self.patch_embedding = nnx.Conv(
            config.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            (config.image_size // p) ** 2 + 1, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, hgt, wid, _ = pixel_values.shape
        if (hgt, wid) != (self.image_size, self.image_size):
            raise ValueError(f"image size {hgt}x{wid} does not match the model's {self.image_size}")
        patches = self.patch_embedding(pixel_values)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class CLIPVisionModel(nnx.Module):
    """transformers' ``CLIPVisionModel`` (keys without ``vision_model.``); images NHWC."""

    STACKED = ("encoder.layers",)
    BARE = ("embeddings.class_embedding",)

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.encoder = CLIPEncoder(config, causal=False, rngs=rngs)
        self.post_layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    def __call__(
        self, pixel_values: jax.Array, *, output_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """(B, H, W, C) images -> (B, 1 + patches, d) last hidden state (no post-norm), as transformers.

        With ``output_hidden_states`` also the (L+1, B, 1 + patches, d) states, pre-normed embeddings first.
        """
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        last, states = self.encoder(h, output_hidden_states=output_hidden_states)
        return (last, states) if output_hidden_states else last

    def pooled(self, last_hidden: jax.Array) -> jax.Array:
        """(B, d): the class token, post-layer-normed."""
        return self.post_layernorm(last_hidden[:, 0])


class CLIPModel(nnx.Module):
    """transformers' ``CLIPModel``: both towers, their projections and ``logit_scale``."""

    STACKED = ("text_model.encoder.layers", "vision_model.encoder.layers")
    BARE = ("vision_model.embeddings.class_embedding", "logit_scale")

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextModel(config.text_config, rngs=rngs)
        self.vision_model = CLIPVisionModel(config.vision_config, rngs=rngs)
        dim = config.projection_dim
        self.text_projection = nnx.Linear(config.text_config.hidden_size, dim, use_bias=False, rngs=rngs)
        self.visual_projection = nnx.Linear(config.vision_config.hidden_size, dim, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, projection_dim) unnormalised text embeddings."""
        return self.text_projection(self.text_model.pooled(self.text_model(input_ids), input_ids))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) images -> (B, projection_dim) unnormalised image embeddings."""
        return self.visual_projection(self.vision_model.pooled(self.vision_model(pixel_values)))

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> jax.Array:
        """transformers' ``logits_per_text`` (B_text, B_image): scaled cosine similarities."""
        t = self.get_text_features(input_ids)
        i = self.get_image_features(pixel_values)
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale[...]) * t @ i.T
