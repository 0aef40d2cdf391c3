"""The SD image autoencoder: diffusers' ``AutoencoderKL`` in Flax NNX, NHWC, param paths = its keys."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jax_erasepro.models.config import ConfigError, JsonConfig
from jax_erasepro.models.resnet import conv, group_norm
from jax_erasepro.models.unet_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(JsonConfig):
    """diffusers' ``vae/config.json``; ``scaling_factor`` (absent in SD v1.4's file) as diffusers."""

    ACCEPTED: ClassVar = {
        # Only picks fp32 decoding under fp16 pipelines; our params are float32 either way.
        "force_upcast": (True, False),
        "shift_factor": (None,),
        "latents_mean": (None,),
        "latents_std": (None,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
    }

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215

    def validate(self, source: str) -> None:
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for value in getattr(self, key):
                if value != kind:
                    raise ConfigError(f"{source}: unsupported {key} entry {value!r} (supported: {kind!r})")
            if len(getattr(self, key)) != len(self.block_out_channels):
                raise ConfigError(f"{source}: {key} needs one entry per block_out_channels entry")
        if self.act_fn != "silu":
            raise ConfigError(f"{source}: unsupported act_fn={self.act_fn!r} (supported: 'silu')")
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ConfigError(f"{source}: block_out_channels not divisible by norm_num_groups")


class Encoder(nnx.Module):
    """Image (B, H, W, 3) -> the Gaussian's moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, chans[0], 3, pad=1, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    chans[max(i - 1, 0)],
                    ch,
                    num_layers=cfg.layers_per_block,
                    groups=groups,
                    add_downsample=i < len(chans) - 1,
                    rngs=rngs,
                )
                for i, ch in enumerate(chans)
            ]
        )
        self.mid_block = UNetMidBlock2D(chans[-1], groups=groups, rngs=rngs)
        self.conv_norm_out = group_norm(chans[-1], groups, 1e-6, rngs=rngs)
        self.conv_out = conv(chans[-1], 2 * cfg.latent_channels, 3, pad=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, 3)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, chans[0], 3, pad=1, rngs=rngs)
        self.mid_block = UNetMidBlock2D(chans[0], groups=groups, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    chans[max(i - 1, 0)],
                    ch,
                    num_layers=cfg.layers_per_block + 1,
                    groups=groups,
                    add_upsample=i < len(chans) - 1,
                    rngs=rngs,
                )
                for i, ch in enumerate(chans)
            ]
        )
        self.conv_norm_out = group_norm(chans[-1], groups, 1e-6, rngs=rngs)
        self.conv_out = conv(chans[-1], cfg.out_channels, 3, pad=1, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """SD's KL autoencoder; ``scaling_factor`` is left to the pipeline, as in diffusers."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = conv(2 * latent, 2 * latent, 1, pad=0, rngs=rngs)
        self.post_quant_conv = conv(latent, latent, 1, pad=0, rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image NHWC in [-1, 1] -> (mean, logvar) of the latent Gaussian, logvar clamped to [-30, 20]."""
        mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents NHWC -> image NHWC (roughly in [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))
