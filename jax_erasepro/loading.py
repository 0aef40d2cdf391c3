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

from jax_erasepro.compvis import (
    OPEN_CLIP_LAYOUT,
    SD2_CONTEXT,
    compvis_tensor_to_diffusers,
    file_text_layout,
    infer_configs,
    plan_compvis_to_diffusers,
)
from jax_erasepro.errors import LoadError
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.config import ConfigError, read_json_object
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.safefiles import SAFETENSORS_NAMES, parse_header
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.sd import SDConfig, SourceInfo, StableDiffusion
from jax_erasepro.tokenizer import clip_tokenizer_path, load_tokenizer, tokenizer_fingerprint
from jax_erasepro.weights import CHUNK_BYTES, WeightsError, abstract_model, load_state_dict

TEXT_PREFIX = "text_model."
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DEFAULT_CONFIGS = Path(str(resources.files("jax_erasepro") / "assets" / "sd-v1-4-configs"))
# Files that mark the folders ``save_pretrained`` writes in its own formats.
ORBAX_MARKER, ORBAX_PARAMS, DELTA_MARKER = "jax_erasepro_orbax.json", "params", "delta.json"
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Buffers some exporters write that are not parameters.
IGNORED_KEYS = {"text_encoder": ("embeddings.position_ids",)}
# The safetensors ``__metadata__`` entry where a single file of ours keeps its configs (a JSON string).
SINGLE_FILE_CONFIGS = "jax_erasepro.configs"
CONFIG_PATHS = {
    "model_index": "model_index.json",
    "scheduler": "scheduler/scheduler_config.json",
    "text_encoder": "text_encoder/config.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# What an SD v2.x file's shapes cannot tell, chosen as diffusers' from_single_file does without the Hub: its
# "v2" model type (a 1024-wide context) is stabilityai/stable-diffusion-2-1, the 768-v model, and a file
# without global_step 875000 (every safetensors file) is v-prediction. That repo's scheduler, and 768 px.
# prediction_type="epsilon" picks the 512-base models instead (64 latents).
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_SAMPLE_SIZE = {"v_prediction": 96, "epsilon": 64}
SD2_PAD_TOKEN = "!"  # SD v2.x's tokenizer: SD v1.x's CLIP BPE, padded with "!" (id 0) as OpenCLIP pads


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
        try:
            return self._read(out, check, chunk_bytes)
        except OSError as e:
            raise WeightsError(f"{self.path}: reading the file failed ({e.strerror or e})") from None

    def _read(self, out: np.ndarray, check: Callable[[np.ndarray], bool] | None, chunk_bytes: int) -> bool:
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

    def row_slice(self, start: int, stop: int) -> FileTensor:
        """Rows ``start:stop`` along dim 0, still unread (they are one contiguous byte range)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} of a tensor of shape {self.shape}")
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        shape = (stop - start, *self.shape[1:])
        return dataclasses.replace(self, offset=self.offset + start * row_bytes, shape=shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)


class SafetensorsReader:
    """Key -> tensor of one safetensors file, read with ``pread`` (``lazy``: straight into the caller's
    buffer), never memory-mapped, so a file cut short while it is read raises instead of killing the process
    with SIGBUS. The header is validated up front (``safefiles.parse_header``, as strictly as the safetensors
    library); errors name the file and the tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            header, self.metadata = parse_header(path)
            self._entries = {k: (e.begin, e.end, e.dtype, e.shape) for k, e in header.items()}
        except (ValueError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
        self.keys = set(self._entries)

    def _entry(self, key: str) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        if key not in self._entries:
            raise WeightsError(f"{self.path}: no tensor {key!r}")
        return self._entries[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self.lazy(key))

    def lazy(self, key: str) -> FileTensor:
        """The tensor ``key`` as a ``FileTensor``: read later, straight into its destination."""
        begin, _, dtype, shape = self._entry(key)
        return FileTensor(self.path, begin, dtype, shape)

    def dtypes(self) -> dict[str, str]:
        return {k: SAFETENSORS_NAMES[e[2]] for k, e in self._entries.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e[3] for k, e in self._entries.items()}


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


def _configs_from_dicts(raw: dict[str, Any], where: dict[str, str]) -> tuple[SDConfig, SchedulerConfig]:
    """Our config objects from raw diffusers-style dicts (component -> JSON object); ``where`` names each
    one's origin (a file, or a single file's metadata) for error messages."""
    model_index = raw["model_index"]
    if not isinstance(model_index, dict):
        raise ConfigError(f"{where['model_index']}: holds a JSON {type(model_index).__name__}, not an object")
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if comp not in model_index:
            raise ConfigError(f"{where['model_index']}: no {comp!r} component")
    config = SDConfig(
        text_encoder=CLIPTextConfig.from_dict(raw["text_encoder"], source=where["text_encoder"]),
        unet=UNet2DConditionConfig.from_dict(raw["unet"], source=where["unet"]),
        vae=AutoencoderKLConfig.from_dict(raw["vae"], source=where["vae"]),
        model_index=model_index,
    )
    return config, SchedulerConfig.from_dict(raw["scheduler"], source=where["scheduler"])


def _read_raw_configs(root: Path) -> dict[str, dict[str, Any]]:
    """The JSON objects of a diffusers-layout folder's config files, by component (``model_index`` too)."""
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"missing {root / 'model_index.json'} (not a diffusers folder)")
    return {name: read_json_object(root / rel) for name, rel in CONFIG_PATHS.items()}


def _read_configs(root: Path) -> tuple[SDConfig, SchedulerConfig, dict[str, dict[str, Any]]]:
    """The configs of a diffusers-layout folder, and the raw JSON they came from (written back on export)."""
    raw = _read_raw_configs(root)
    cfg, sched = _configs_from_dicts(raw, {name: str(root / rel) for name, rel in CONFIG_PATHS.items()})
    return cfg, sched, raw


def _tokenizer_folder(root: Path) -> Path:
    """A folder's ``tokenizer/``, or SD v1.x's CLIP tokenizer shipped in the package when it has none."""
    own = root / "tokenizer"
    return own if own.is_dir() else clip_tokenizer_path()


def _single_file_configs(
    path: Path, reader: SafetensorsReader, prediction_type: str | None
) -> tuple[dict[str, dict[str, Any]], dict[str, str], str | None]:
    """Raw configs of a single file: from our ``__metadata__`` when it has them (and the fingerprint of the
    tokenizer it was saved with), else SD v1.4's shipped configs with what the tensor shapes fix put in (and
    for SD v2.x, ``SD2_SCHEDULER`` and its sample size, by ``prediction_type``)."""
    text = reader.metadata.get(SINGLE_FILE_CONFIGS)
    if text is not None:
        where = {name: f"{path} (metadata {SINGLE_FILE_CONFIGS}: {name})" for name in CONFIG_PATHS}
        try:
            stored = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ConfigError(f"{path}: metadata {SINGLE_FILE_CONFIGS!r} is not valid JSON") from None
        if not isinstance(stored, dict) or not all(isinstance(stored.get(n), dict) for n in CONFIG_PATHS):
            need = ", ".join(CONFIG_PATHS)
            raise ConfigError(f"{path}: metadata {SINGLE_FILE_CONFIGS!r} lacks a config (needs {need})")
        tok = stored.get("tokenizer")
        fingerprint = tok.get("fingerprint") if isinstance(tok, dict) else None
        return {n: stored[n] for n in CONFIG_PATHS}, where, fingerprint
    raw = _read_raw_configs(DEFAULT_CONFIGS)
    inferred = infer_configs(reader.shapes(), source=str(path))
    for comp, fields in inferred.items():
        raw[comp] = {**raw[comp], **fields}
    if inferred["unet"]["cross_attention_dim"] == SD2_CONTEXT:  # diffusers' "v2" model type
        pred = prediction_type or SD2_SCHEDULER["prediction_type"]
        raw["scheduler"] = {**SD2_SCHEDULER, "prediction_type": pred}
        raw["unet"]["sample_size"] = SD2_SAMPLE_SIZE.get(pred, SD2_SAMPLE_SIZE["v_prediction"])
    where = {name: f"{path} (inferred from its tensor shapes: {name})" for name in CONFIG_PATHS}
    return raw, where, None


def _single_file_tokenizer(path: Path, fingerprint: str | None, open_clip: bool) -> Any:
    """The shipped CLIP tokenizer: SD v1.x's, or for an OpenCLIP (SD v2.x) file SD v2.x's (pad "!") first;
    refused when the file records a tokenizer that is neither."""
    candidates = [load_tokenizer(clip_tokenizer_path())]
    if open_clip:
        sd2 = load_tokenizer(clip_tokenizer_path())
        sd2.pad_token = SD2_PAD_TOKEN
        candidates.insert(0, sd2)
    for tokenizer in candidates:
        if fingerprint is None or fingerprint == tokenizer_fingerprint(tokenizer):
            return tokenizer
    which = "SD v2.x's or SD v1.x's CLIP tokenizers" if open_clip else "SD v1.x's CLIP tokenizer"
    raise LoadError(
        f"{path} was saved with a tokenizer other than {which} that jax-erasepro ships; "
        "pass tokenizer=<a folder with its tokenizer files> (or config=<its diffusers folder>)"
    )


def _load_single_file(
    path: Path,
    config: str | Path | None,
    dtype: Any,
    tokenizer: str | Path | None,
    prediction_type: str | None,
) -> StableDiffusion:
    """A CompVis single-file ``.safetensors``, keys mapped by ``compvis.py``. Configs from the folder
    ``config``, else from the file's own metadata (ours), else inferred from its tensor shapes."""
    reader = SafetensorsReader(path)
    if config is not None:
        cfg_root = Path(config)
        cfg, sched_cfg, raw = _read_configs(cfg_root)
        tok = load_tokenizer(tokenizer if tokenizer is not None else _tokenizer_folder(cfg_root))
    else:
        raw, where, fingerprint = _single_file_configs(path, reader, prediction_type)
        cfg, sched_cfg = _configs_from_dicts(raw, where)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            tok = _single_file_tokenizer(path, fingerprint, file_text_layout(reader.keys) == OPEN_CLIP_LAYOUT)
    dicts = {"text_encoder": cfg.text_encoder.to_dict(), "unet": cfg.unet.to_dict(), "vae": cfg.vae.to_dict()}
    plan = plan_compvis_to_diffusers(reader.keys, dicts, source=str(path))
    file_dtypes = reader.dtypes()
    models, components = {}, {}
    for name, abstract in _abstract_models(cfg).items():
        rows = plan[name]

        def get(k: str, rows: dict = rows) -> Any:
            return compvis_tensor_to_diffusers(reader.lazy(rows[k][0]), rows[k], source=str(path))

        models[name] = load_state_dict(
            abstract,
            get,
            set(rows),
            source=str(path),
            dtype=dtype,
        )
        dtypes = {k: file_dtypes[row[0]] for k, row in rows.items()}
        components[name] = {"file": path.name, "key_prefix": "", "dtypes": dtypes, "config": raw[name]}
    components["scheduler"] = {"config": raw["scheduler"]}
    return StableDiffusion(
        **models,
        tokenizer=tok,
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(path.resolve()), format="single_file", components=components),
    )


def _orbax_marker(root: Path) -> dict[str, Any]:
    """The marker of an orbax folder, checked to be what ``save_pretrained`` writes (LoadError naming it)."""
    marker = root / ORBAX_MARKER
    try:
        meta = read_json_object(marker)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    components = meta.get("source_components")
    if meta.get("format") != "jax_erasepro.orbax" or not isinstance(components, dict):
        raise LoadError(f"{marker}: not a jax_erasepro orbax marker (needs format and source_components)")
    if not all(isinstance(v, dict) for v in components.values()):
        raise LoadError(f"{marker}: source_components must map each component to an object")
    return meta


def _load_orbax(root: Path, dtype: Any, tokenizer: str | Path | None) -> StableDiffusion:
    """A folder from ``save_pretrained(format="orbax")``: configs, tokenizer and one orbax checkpoint."""
    import orbax.checkpoint as ocp

    meta = _orbax_marker(root)
    cfg, sched_cfg, _ = _read_configs(root)
    abstract = _abstract_models(cfg)
    target = {name: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for name, m in abstract.items()}
    try:
        restored = ocp.StandardCheckpointer().restore((root / ORBAX_PARAMS).resolve(), target)
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{root / ORBAX_PARAMS}: cannot restore the orbax checkpoint ({first})") from None
    models = {}
    for name, model in abstract.items():
        graphdef, state = nnx.split(model)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), restored[name])
        nnx.replace_by_pure_dict(state, params)
        models[name] = nnx.merge(graphdef, state)
    return StableDiffusion(
        **models,
        tokenizer=load_tokenizer(tokenizer if tokenizer is not None else root / "tokenizer"),
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(root.resolve()), format="orbax", components=meta["source_components"]),
    )


def _float_dtype(dtype: Any) -> Any:
    """``dtype`` as a JAX float dtype; LoadError naming the argument for anything else."""
    try:
        jdtype = jnp.dtype(dtype)
    except TypeError:
        jdtype = None
    if jdtype is None or jdtype.name not in FLOAT_DTYPES:
        raise LoadError(f"dtype={dtype!r}: params are floats; use one of {', '.join(FLOAT_DTYPES)}")
    return jdtype


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
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
) -> StableDiffusion:
    """Load SD v1.x/v2.x into JAX: a diffusers folder (safetensors, fp32 or the fp16 variant), a folder saved
    with ``format="orbax"``, or a CompVis single-file ``.safetensors``.

    A single file takes its configs from ``config`` (a diffusers folder) when given, else from its own
    metadata (files ``save_pretrained`` writes), else from its tensor shapes (SD v1.x: epsilon; SD v2.x, as
    diffusers assumes: the 768-v model, v-prediction and DDIM); its tokenizer is ``config``'s, else the CLIP
    tokenizer shipped here (SD v2.x's pads with "!"). ``prediction_type`` overrides the scheduler's of any
    format (for an SD v2.x file inferred from shapes, ``"epsilon"`` also means 512 px: the base models).
    ``tokenizer`` (a folder) overrides the tokenizer of any format. ``dtype`` is the params' float dtype in
    memory; ``variant`` picks e.g. ``"fp16"`` weight files. ``path=None`` loads the embedded default model.
    """
    if prediction_type is not None:  # checked before any weight is read
        SchedulerConfig.from_dict({"prediction_type": prediction_type}, source="prediction_type=")
    sd = _load(path, _float_dtype(dtype), variant, config, tokenizer, prediction_type)
    if prediction_type is None or prediction_type == sd.scheduler_config.prediction_type:
        return sd
    sched = dataclasses.replace(sd.scheduler_config, prediction_type=prediction_type)
    return sd.replace(scheduler_config=sched)


def _load(
    path: str | Path | None,
    jdtype: Any,
    variant: str | None,
    config: str | Path | None,
    tokenizer: str | Path | None,
    prediction_type: str | None,
) -> StableDiffusion:
    if path is None:
        from jax_erasepro.default_model import default_model_path

        path = default_model_path()
    root = Path(path)
    if root.is_file():
        if root.suffix in PICKLED_SUFFIXES:
            raise WeightsError(
                f"{root}: a pickled checkpoint; load_pretrained reads safetensors only. Convert it first: "
                f"`python -m convert.ckpt {root} OUT.safetensors` (or `python -m convert.single_file`)"
            )
        if root.suffix != ".safetensors":
            raise WeightsError(f"{root}: unknown file type (expected a single-file .safetensors)")
        return _load_single_file(root, config, jdtype, tokenizer, prediction_type)
    if not root.is_dir():
        raise FileNotFoundError(f"no such model folder: {root}")
    if (root / ORBAX_MARKER).is_file():
        return _load_orbax(root, jdtype, tokenizer)
    if (root / DELTA_MARKER).is_file():
        raise ValueError(
            f"{root} is a delta, not a model: use apply_delta(load_pretrained(BASE), {str(root)!r})"
        )
    cfg, sched_cfg, raw = _read_configs(root)
    models, components = {}, {}
    for name, abstract in _abstract_models(cfg).items():
        models[name], components[name] = _load_component(root, name, abstract, jdtype, variant)
        components[name]["config"] = raw[name]
    components["scheduler"] = {"config": raw["scheduler"]}
    return StableDiffusion(
        **models,
        tokenizer=load_tokenizer(tokenizer if tokenizer is not None else root / "tokenizer"),
        scheduler_config=sched_cfg,
        config=cfg,
        source=SourceInfo(path=str(root.resolve()), format="diffusers", components=components),
    )
