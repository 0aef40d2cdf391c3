"""Down, mid and up blocks of the SD UNet and VAE (diffusers ``unet_2d_blocks.py``), on NHWC feature maps.

UNet down blocks return their output and the skip states they push; up blocks pop them in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jax_erasepro.models.attention import SpatialSelfAttention, Transformer2DModel
from jax_erasepro.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class BlockSpec:
    """What a UNet block needs from the model config (widths and norms are shared by all its layers)."""

    temb_channels: int
    groups: int
    eps: float
    heads: int
    cross_attention_dim: int
    use_linear_projection: bool


def _transformer(channels: int, spec: BlockSpec, rngs: nnx.Rngs) -> Transformer2DModel:
    return Transformer2DModel(
        channels,
        heads=spec.heads,
        cross_attention_dim=spec.cross_attention_dim,
        groups=spec.groups,
        use_linear_projection=spec.use_linear_projection,
        rngs=rngs,
    )


def _resnet(cin: int, cout: int, spec: BlockSpec, rngs: nnx.Rngs, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        cin,
        cout,
        temb_channels=spec.temb_channels,
        groups=spec.groups,
        eps=spec.eps,
        output_scale_factor=scale,
        rngs=rngs,
    )


class DownBlock2D(nnx.Module):
    """``num_layers`` resnets, then an optional stride-2 ``downsamplers.0``; every output is a skip state."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        spec: BlockSpec,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                _resnet(in_channels if i == 0 else out_channels, out_channels, spec, rngs)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
            if add_downsample
            else None
        )

    def _attend(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        return x

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._attend(i, resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """``DownBlock2D`` with a ``Transformer2DModel`` after each resnet (``attentions.i``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        spec: BlockSpec,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(in_channels, out_channels, num_layers=num_layers, spec=spec, rngs=rngs, **kwargs)
        self.attentions = nnx.List([_transformer(out_channels, spec, rngs) for _ in range(num_layers)])

    def _attend(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        return self.attentions[i](x, context)


class UpBlock2D(nnx.Module):
    """Resnets over [x, popped skip] concatenated on channels, then an optional ``upsamplers.0``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        spec: BlockSpec,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                _resnet(
                    (prev_output_channel if i == 0 else out_channels)
                    + (in_channels if i == num_layers - 1 else out_channels),
                    out_channels,
                    spec,
                    rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

    def _attend(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        return x

    def __call__(
        self,
        x: jax.Array,
        skips: list[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """``skips`` are this block's skip states in push order (the last is consumed first)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
            x = self._attend(i, x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """``UpBlock2D`` with a ``Transformer2DModel`` after each resnet (``attentions.i``)."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        *,
        num_layers: int,
        spec: BlockSpec,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(
            in_channels,
            prev_output_channel,
            out_channels,
            num_layers=num_layers,
            spec=spec,
            rngs=rngs,
            **kwargs,
        )
        self.attentions = nnx.List([_transformer(out_channels, spec, rngs) for _ in range(num_layers)])

    def _attend(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        return self.attentions[i](x, context)


class UNetMidBlock2DCrossAttn(nnx.Module):
    """``resnets.0``, then (``attentions.0``, ``resnets.1``) at the lowest resolution."""

    def __init__(self, channels: int, *, output_scale_factor: float, spec: BlockSpec, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [_resnet(channels, channels, spec, rngs, output_scale_factor) for _ in range(2)]
        )
        self.attentions = nnx.List([_transformer(channels, spec, rngs)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def _vae_resnet(cin: int, cout: int, groups: int, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, temb_channels=None, groups=groups, eps=1e-6, rngs=rngs)


class DownEncoderBlock2D(nnx.Module):
    """VAE encoder block: resnets without time embedding, then an optional ``downsamplers.0``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups, rngs)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=0, rngs=rngs)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nnx.Module):
    """VAE decoder block: resnets without time embedding, then an optional ``upsamplers.0``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups, rngs)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nnx.Module):
    """VAE mid block: ``resnets.0``, ``attentions.0`` (single-head self-attention), ``resnets.1``."""

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs):
        self.resnets = nnx.List([_vae_resnet(channels, channels, groups, rngs) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(channels, groups=groups, eps=1e-6, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))
