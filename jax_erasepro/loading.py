"""Read Stable Diffusion (diffusers folder, CompVis single file, orbax folder) into Flax NNX, without torch.

Target trees come from ``nnx.eval_shape`` (no throw-away random init); tensors stream from safetensors
straight into them through the strict map of ``weights.py``. Every failure names the file and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.compvis import compvis_tensor_to_diffusers, plan_compvis_to_diffusers
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.config import ConfigError
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.pipeline import SDConfig, SourceInfo, StableDiffusion
from jax_erasepro.safefiles import SAFETENSORS_NAMES, parse_header
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.tokenizer import load_tokenizer
from jax_erasepro.weights import CHUNK_BYTES, WeightsError, abstract_model, load_state_dict

TEXT_PREFIX = "text_model."
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DEFAULT_CONFIGS = Path(str(resources.files("jax_erasepro") / "assets" / "sd-v1-4-configs"))
# Files that mark the folders ``save_pretrained`` writes in its own formats.
ORBAX_MARKER, ORBAX_PARAMS, DELTA_MARKER = "jax_erasepro_orbax.json", "params", "delta.json"
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


@dataclasses.dataclass(frozen=True)
class FileTensor:
    """One tensor of a safetensors file, not read yet. ``read_into`` copies its bytes from the file straight
    into a caller's buffer with ``pread`` (no page-faulting memory map, no intermediate array)."""

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read_into(
        self,
        out: np.ndarray,
        check: Callable[[np.ndarray], bool] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> bool:
        """Fill the C-contiguous ``out`` (this tensor's shape and dtype) from the file. With ``check``, read
        in pieces of about ``chunk_bytes`` and run it on each piece while that is in cache; returns False at
        the first piece that fails (True when all pass, or there is no check)."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"need a contiguous {self.dtype} {self.shape} buffer, got {out.dtype} {out.shape}"
            )
        flat = out.reshape(-1)
        step = max(1, chunk_bytes // self.dtype.itemsize) if check is not None else max(flat.size, 1)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, flat.size, step):
                piece = flat[start : start + step]
                view, offset, done = memoryview(piece.view(np.uint8)), self.offset + start * piece.itemsize, 0
                while done < len(view):
                    n = os.preadv(f.fileno(), [view[done:]], offset + done)
                    if n == 0:
                        raise WeightsError(f"{self.path}: the file ends inside a tensor (truncated?)")
                    done += n
                if check is not None and not check(piece):
                    return False
        return True

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)


class SafetensorsReader:
    """Zero-copy key -> numpy view of one safetensors file (memory-mapped), so a loader copies each tensor
    once, straight into its param. The header is validated up front (``safefiles.parse_header``, as strictly
    as the safetensors library); errors name the file and the tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            header, _ = parse_header(path)
            self._entries = {k: (e.begin, e.end, e.dtype, e.shape) for k, e in header.items()}
            has_data = any(e.end > e.begin for e in header.values())  # memmap refuses an empty region
            self._map = np.memmap(path, np.uint8, mode="r") if has_data else np.zeros(0, np.uint8)
        except (ValueError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        self.keys = set(self._entries)

    def _entry(self, key: str) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        if key not in self._entries:
            raise WeightsError(f"{self.path}: no tensor {key!r}")
        return self._entries[key]

    def __getitem__(self, key: str) -> np.ndarray:
        begin, end, dtype, shape = self._entry(key)
        return self._map[begin:end].view(dtype).reshape(shape)

    def lazy(self, key: str) -> FileTensor:
        """The tensor ``key`` as a ``FileTensor``: read later, straight into its destination."""
        begin, _, dtype, shape = self._entry(key)
        return FileTensor(self.path, begin, dtype, shape)

    def dtypes(self) -> dict[str, str]:
        return {k: SAFETENSORS_NAMES[e[2]] for k, e in self._entries.items()}


def _load_component(
    folder: Path, name: str, abstract: nnx.Module, dtype: Any, variant: str | None
) -> tuple[nnx.Module, dict[str, Any]]:
    path = _weights_file(folder / name, WEIGHT_NAMES[name], variant)
    reader = SafetensorsReader(path)
    prefix = ""
    if name == "text_encoder" and reader.keys and all(k.startswith(TEXT_PREFIX) for k in reader.keys):
        prefix = TEXT_PREFIX
    keys = {k[len(prefix) :] for k in reader.keys}
    ignored = IGNORED_KEYS.get(name, ())
    model = load_state_dict(
        abstract,
        lambda k: reader.lazy(prefix + k),
        keys,
        source=str(path),
        dtype=dtype,
        ignore=lambda k: k in ignored,
    )
    return model, {"file": path.name, "key_prefix": prefix, "dtypes": reader.dtypes()}


def _abstract_models(cfg: SDConfig) -> dict[str, nnx.Module]:
    """Component name -> its tree of shapes, in the order the loaders read them."""
    return {
        "text_encoder": abstract_model(CLIPTextModel, cfg.text_encoder),
        "unet": abstract_model(UNet2DConditionModel, cfg.unet),
        "vae": abstract_model(AutoencoderKL, cfg.vae),
    }


def _read_configs(root: Path) -> tuple[SDConfig, SchedulerConfig]:
    """The configs of a diffusers-layout folder (model_index.json and each component's config file)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"missing {index_path} (not a diffusers folder)")
    model_index = json.loads(index_path.read_text())
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if comp not in model_index:
            raise ConfigError(f"{index_path}: no {comp!r} component")
    config = SDConfig(
        text_encoder=CLIPTextConfig.from_json(root / "text_encoder" / "config.json"),
        unet=UNet2DConditionConfig.from_json(root / "unet" / "config.json"),
        vae=AutoencoderKLConfig.from_json(root / "vae" / "config.json"),
        model_index=model_index,
    )
    return config, SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json")


def _tokenizer_folder(root: Path) -> Path:
    """A folder's ``tokenizer/``, or SD v1.4's tokenizer shipped in the package when it has none."""
    own = root / "tokenizer"
    return own if own.is_dir() else Path(str(resources.files("jax_erasepro") / "assets" / "clip_tokenizer"))


def _load_single_file(path: Path, config: str | Path | None, dtype: Any) -> StableDiffusion:
    """A CompVis single-file ``.safetensors``, keys mapped by ``compvis.py``; configs from ``config``."""
    cfg_root = Path(config) if config is not None else DEFAULT_CONFIGS
    cfg, sched_cfg = _read_configs(cfg_root)
    reader = SafetensorsReader(path)
    dicts = {"text_encoder": cfg.text_encoder.to_dict(), "unet": cfg.unet.to_dict(), "vae": cfg.vae.to_dict()}
    plan = plan_compvis_to_diffusers(reader.keys, dicts, source=str(path))
    file_dtypes = reader.dtypes()
    models, components = {}, {}
    for name, abstract in _abstract_models(cfg).items():
        rows = plan[name]
        models[name] = load_state_dict(
            abstract,
            lambda k, rows=rows: compvis_tensor_to_diffusers(reader[rows[k][0]], rows[k], source=str(path)),
            set(rows),
            source=str(path),
            dtype=dtype,
        )
        dtypes = {k: file_dtypes[row[0]] for k, row in rows.items()}
        components[name] = {"file": path.name, "key_prefix": "", "dtypes": dtypes}
    return StableDiffusion(
        **models,
        tokenizer=load_tokenizer(_tokenizer_folder(cfg_root)),
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(path.resolve()), format="single_file", components=components),
    )


def _load_orbax(root: Path, dtype: Any) -> StableDiffusion:
    """A folder from ``save_pretrained(format="orbax")``: configs, tokenizer and one orbax checkpoint."""
    import orbax.checkpoint as ocp

    meta = json.loads((root / ORBAX_MARKER).read_text())
    cfg, sched_cfg = _read_configs(root)
    abstract = _abstract_models(cfg)
    target = {name: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for name, m in abstract.items()}
    try:
        restored = ocp.StandardCheckpointer().restore((root / ORBAX_PARAMS).resolve(), target)
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
        raise WeightsError(f"{root / ORBAX_PARAMS}: cannot restore the orbax checkpoint ({e})") from None
    models = {}
    for name, model in abstract.items():
        graphdef, state = nnx.split(model)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), restored[name])
        nnx.replace_by_pure_dict(state, params)
        models[name] = nnx.merge(graphdef, state)
    return StableDiffusion(
        **models,
        tokenizer=load_tokenizer(root / "tokenizer"),
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(root.resolve()), format="orbax", components=meta["source_components"]),
    )


def _gc_paused(fn: Any) -> Any:
    """Run ``fn`` with Python's cyclic GC off: a load allocates many small objects while the heap holds
    large module graphs, and each full collection they trigger walks all of it (~0.4 s per SD load)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_gc_paused
def load_pretrained(
    path: str | Path | None = None,
    *,
    dtype: str = "float32",
    variant: str | None = None,
    config: str | Path | None = None,
) -> StableDiffusion:
    """Load SD v1.x into JAX: a diffusers folder (safetensors, fp32 or the fp16 variant), a folder saved with
    ``format="orbax"``, or a CompVis single-file ``.safetensors`` (configs from the diffusers folder
    ``config``, default SD v1.4's shipped ones).

    ``dtype`` is the params' dtype in memory; ``variant`` picks e.g. ``"fp16"`` weight files.
    ``path=None`` loads the embedded default model.
    """
    if path is None:
        from jax_erasepro.default_model import default_model_path

        path = default_model_path()
    root = Path(path)
    jdtype = jnp.dtype(dtype)
    if root.is_file():
        if root.suffix in PICKLED_SUFFIXES:
            raise WeightsError(
                f"{root}: a pickled checkpoint; load_pretrained reads safetensors only. Convert it first: "
                f"`python -m convert.ckpt {root} OUT.safetensors` (or `python -m convert.single_file`)"
            )
        if root.suffix != ".safetensors":
            raise WeightsError(f"{root}: unknown file type (expected a single-file .safetensors)")
        return _load_single_file(root, config, jdtype)
    if not root.is_dir():
        raise FileNotFoundError(f"no such model folder: {root}")
    if (root / ORBAX_MARKER).is_file():
        return _load_orbax(root, jdtype)
    if (root / DELTA_MARKER).is_file():
        raise ValueError(
            f"{root} is a delta, not a model: use apply_delta(load_pretrained(BASE), {str(root)!r})"
        )
    cfg, sched_cfg = _read_configs(root)
    models, components = {}, {}
    for name, abstract in _abstract_models(cfg).items():
        models[name], components[name] = _load_component(root, name, abstract, jdtype, variant)
    return StableDiffusion(
        **models,
        tokenizer=load_tokenizer(root / "tokenizer"),
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(root.resolve()), format="diffusers", components=components),
    )
