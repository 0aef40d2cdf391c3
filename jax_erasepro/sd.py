"""The model container: an SD v1.x model's three NNX modules, its tokenizer, scheduler config and origin."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_erasepro import schedulers
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig


@dataclasses.dataclass(frozen=True)
class SDConfig:
    """The configs of the three models and the folder's model_index.json."""

    text_encoder: CLIPTextConfig
    unet: UNet2DConditionConfig
    vae: AutoencoderKLConfig
    model_index: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Where a model was read from and how its files were laid out, so an export can write the same form."""

    path: str | None
    format: str
    components: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StableDiffusion:
    """An SD v1.x model: three NNX modules, the tokenizer and the scheduler config."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: Any
    scheduler_config: schedulers.SchedulerConfig
    config: SDConfig
    source: SourceInfo = SourceInfo(path=None, format="memory")

    def replace(self, **changes: Any) -> StableDiffusion:
        return dataclasses.replace(self, **changes)
