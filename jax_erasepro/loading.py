"""Read a diffusers-format Stable Diffusion folder into Flax NNX, without torch.

Target trees come from ``nnx.eval_shape`` (no throw-away random init); tensors stream from safetensors
straight into them through the strict map of ``weights.py``. Every failure names the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.config import ConfigError
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.pipeline import SDConfig, SourceInfo, StableDiffusion
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.tokenizer import load_tokenizer
from jax_erasepro.weights import WeightsError, load_state_dict

TEXT_PREFIX = "text_model."
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Buffers some exporters write that are not parameters.
IGNORED_KEYS = {"text_encoder": ("embeddings.position_ids",)}


def _weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """The component's safetensors file: the requested variant, else the plain file, else the fp16 variant."""
    plain, fp16 = f"{stem}.safetensors", f"{stem}.fp16.safetensors"
    names = [f"{stem}.{variant}.safetensors"] if variant else [plain, fp16]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.ckpt")]
    if pickled:
        raise WeightsError(
            f"{folder}: only pickled weights ({pickled[0]}); load_pretrained reads safetensors only "
            "(convert with `python -m convert.ckpt`)"
        )
    raise FileNotFoundError(f"missing weights file: {folder / names[0]}")


class SafetensorsReader:
    """Lazy key -> numpy access to one safetensors file, with errors that name the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="numpy")
            self.keys = set(self._f.keys())
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key!r} ({e})") from None

    def dtypes(self) -> dict[str, str]:
        return {k: str(self._f.get_slice(k).get_dtype()) for k in self.keys}


def _load_component(
    folder: Path, name: str, factory: Callable[[], nnx.Module], dtype: Any, variant: str | None
) -> tuple[nnx.Module, dict[str, Any]]:
    path = _weights_file(folder / name, WEIGHT_NAMES[name], variant)
    reader = SafetensorsReader(path)
    prefix = ""
    if name == "text_encoder" and reader.keys and all(k.startswith(TEXT_PREFIX) for k in reader.keys):
        prefix = TEXT_PREFIX
    keys = {k[len(prefix) :] for k in reader.keys}
    ignored = IGNORED_KEYS.get(name, ())
    model = load_state_dict(
        nnx.eval_shape(factory),
        lambda k: reader[prefix + k],
        keys,
        source=str(path),
        dtype=dtype,
        ignore=lambda k: k in ignored,
    )
    return model, {"file": path.name, "key_prefix": prefix, "dtypes": reader.dtypes()}


def load_pretrained(
    path: str | Path | None = None, *, dtype: str = "float32", variant: str | None = None
) -> StableDiffusion:
    """Load a diffusers-format SD v1.x folder (safetensors, fp32 or the fp16 variant) into JAX.

    ``dtype`` is the params' dtype in memory; ``variant`` picks e.g. ``"fp16"`` weight files.
    ``path=None`` loads the embedded default model.
    """
    if path is None:
        from jax_erasepro.default_model import default_model_path

        path = default_model_path()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such model folder: {root}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"missing {index_path} (not a diffusers folder)")
    model_index = json.loads(index_path.read_text())
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if comp not in model_index:
            raise ConfigError(f"{index_path}: no {comp!r} component")
    jdtype = jnp.dtype(dtype)
    text_cfg = CLIPTextConfig.from_json(root / "text_encoder" / "config.json")
    unet_cfg = UNet2DConditionConfig.from_json(root / "unet" / "config.json")
    vae_cfg = AutoencoderKLConfig.from_json(root / "vae" / "config.json")
    sched_cfg = SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
    text_encoder, text_src = _load_component(
        root, "text_encoder", lambda: CLIPTextModel(text_cfg, rngs=nnx.Rngs(0)), jdtype, variant
    )
    unet, unet_src = _load_component(
        root, "unet", lambda: UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(0)), jdtype, variant
    )
    vae, vae_src = _load_component(
        root, "vae", lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), jdtype, variant
    )
    return StableDiffusion(
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        tokenizer=load_tokenizer(root / "tokenizer"),
        scheduler_config=sched_cfg,
        config=SDConfig(text_encoder=text_cfg, unet=unet_cfg, vae=vae_cfg, model_index=model_index),
        source=SourceInfo(
            path=str(root.resolve()),
            format="diffusers",
            components={"text_encoder": text_src, "unet": unet_src, "vae": vae_src},
        ),
    )
