"""The SD 1.x/2.x denoiser: diffusers' ``UNet2DConditionModel`` in Flax NNX, NHWC, param paths = its keys."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jax_erasepro.models.config import ConfigError, JsonConfig
from jax_erasepro.models.embeddings import TimestepEmbedding, timestep_embedding
from jax_erasepro.models.resnet import conv, group_norm
from jax_erasepro.models.unet_blocks import (
    BlockSpec,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

DOWN_BLOCKS = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_BLOCKS = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(JsonConfig):
    """diffusers' ``unet/config.json``; defaults are diffusers' own, other features accepted only when off."""

    ACCEPTED: ClassVar = {
        "num_attention_heads": (None,),  # diffusers itself refuses any other value
        "dropout": (0.0,),
        "only_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False),
        "dual_cross_attention": (False,),
        # Attention always runs in float32 here, so the fp16 upcast (SD 2.1) changes nothing.
        "upcast_attention": (False, True),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
        "class_embeddings_concat": (False,),
        "projection_class_embeddings_input_dim": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "addition_embed_type_num_heads": (64,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0,),
        "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "transformer_layers_per_block": (1,),
        "reverse_transformer_layers_per_block": (None,),
        "attention_type": ("default",),
        "cross_attention_norm": (None,),
    }

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    # diffusers' misnomer: this is the NUMBER of heads per block (SD 1.x: 8; SD 2.x: 5, 10, 20, 20).
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False

    def _per_block(self, key: str) -> tuple:
        value = getattr(self, key)
        return (value,) * len(self.down_block_types) if isinstance(value, int) else tuple(value)

    def num_heads(self, block: int) -> int:
        """Attention heads of down block ``block`` (``attention_head_dim`` in diffusers' config)."""
        return self._per_block("attention_head_dim")[block]

    def cross_dim(self, block: int) -> int:
        """Width of the text states that down block ``block`` attends to."""
        return self._per_block("cross_attention_dim")[block]

    def num_layers(self, block: int) -> int:
        """Resnets in down block ``block`` (its mirrored up block has one more)."""
        return self._per_block("layers_per_block")[block]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def validate(self, source: str) -> None:
        n = len(self.down_block_types)
        for key in ("down_block_types", "up_block_types"):
            table = DOWN_BLOCKS if key == "down_block_types" else UP_BLOCKS
            for kind in getattr(self, key):
                if kind not in table:
                    raise ConfigError(
                        f"{source}: unsupported {key} entry {kind!r} (supported: {sorted(table)})"
                    )
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ConfigError(f"{source}: unsupported mid_block_type={self.mid_block_type!r}")
        if self.act_fn != "silu":
            raise ConfigError(f"{source}: unsupported act_fn={self.act_fn!r} (supported: 'silu')")
        for key in ("up_block_types", "block_out_channels"):
            if len(getattr(self, key)) != n:
                raise ConfigError(f"{source}: {key} needs {n} entries, one per down block")
        for key in ("layers_per_block", "cross_attention_dim", "attention_head_dim"):
            if len(self._per_block(key)) != n:
                raise ConfigError(f"{source}: {key} needs one value or {n}, one per down block")
        for i, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups:
                raise ConfigError(f"{source}: block_out_channels {ch} not divisible by norm_num_groups")
            if ch % self.num_heads(i):
                raise ConfigError(
                    f"{source}: block_out_channels {ch} not divisible by attention_head_dim (heads)"
                )


class UNet2DConditionModel(nnx.Module):
    """Predicts the noise (or v) of an NHWC latent at timesteps, conditioned on text states (B, T, D)."""

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        chans = cfg.block_out_channels
        n = len(chans)

        def spec(block: int) -> BlockSpec:
            return BlockSpec(
                temb_channels=cfg.time_embed_dim,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                heads=cfg.num_heads(block),
                cross_attention_dim=cfg.cross_dim(block),
                use_linear_projection=cfg.use_linear_projection,
            )

        self.conv_in = conv(cfg.in_channels, chans[0], 3, pad=1, rngs=rngs)
        self.time_embedding = TimestepEmbedding(chans[0], cfg.time_embed_dim, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DOWN_BLOCKS[kind](
                    chans[max(i - 1, 0)],
                    chans[i],
                    num_layers=cfg.num_layers(i),
                    add_downsample=i < n - 1,
                    downsample_padding=cfg.downsample_padding,
                    spec=spec(i),
                    rngs=rngs,
                )
                for i, kind in enumerate(cfg.down_block_types)
            ]
        )
        self.mid_block = UNetMidBlock2DCrossAttn(
            chans[-1], output_scale_factor=cfg.mid_block_scale_factor, spec=spec(n - 1), rngs=rngs
        )
        # Up block i mirrors down block n-1-i: diffusers reverses every per-block list.
        self.up_blocks = nnx.List(
            [
                UP_BLOCKS[kind](
                    chans[max(n - 2 - i, 0)],
                    chans[min(n - i, n - 1)],
                    chans[n - 1 - i],
                    num_layers=cfg.num_layers(n - 1 - i) + 1,
                    add_upsample=i < n - 1,
                    spec=spec(n - 1 - i),
                    rngs=rngs,
                )
                for i, kind in enumerate(cfg.up_block_types)
            ]
        )
        self.conv_norm_out = group_norm(chans[0], cfg.norm_num_groups, cfg.norm_eps, rngs=rngs)
        self.conv_out = conv(chans[0], cfg.out_channels, 3, pad=1, rngs=rngs)

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array
    ) -> jax.Array:
        """(B, h, w, C_in) latents, scalar or (B,) timesteps, (B, T, D) text states -> (B, h, w, C_out)."""
        cfg = self.config
        batch = sample.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        temb = self.time_embedding(
            timestep_embedding(
                t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
            ).astype(sample.dtype)  # as diffusers: a bfloat16 sample keeps the whole UNet in bfloat16
        )
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size: exactly 2x unless a down conv rounded an odd size up.
            size = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, temb, encoder_hidden_states, size)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)
