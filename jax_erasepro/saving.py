"""Write a StableDiffusion out: a diffusers folder, a CompVis single file, an orbax folder, a delta or a LoRA.

Every tensor is written in the dtype and key form its source file had (``sd.source``), so untouched tensors
come back bit-identical; a model built in memory writes float32. Writes are atomic (``safefiles.py``), and
``overwrite`` replaces only an output of ours (``foreign_reason``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jax_erasepro import safefiles
from jax_erasepro.compvis import compvis_entries, to_compvis_tensor
from jax_erasepro.delta import DELTA_FILE, write_delta
from jax_erasepro.errors import SaveError
from jax_erasepro.loading import CONFIG_PATHS, DELTA_MARKER, ORBAX_MARKER, ORBAX_PARAMS, SINGLE_FILE_CONFIGS
from jax_erasepro.lora import LORA_FILE, LORA_MARKER, write_lora
from jax_erasepro.schedulers import DEFAULT_CLASS
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.tokenizer import tokenizer_fingerprint
from jax_erasepro.weights import iter_state_dict, state_dict_shapes

FORMATS = ("diffusers", "single_file", "orbax", "delta", "lora")
COMPONENTS = ("text_encoder", "unet", "vae")
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these files are tested against
POSITION_IDS = "embeddings.position_ids"
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
TOKENIZER_FILES = tuple(f"tokenizer/{name}" for name in TOKENIZER_NAMES)
# What each of our folder formats holds, found by its marker file (checked in this order); a name ending in
# "/" stands for a whole tree another library writes (orbax's checkpoint).
OWN_LAYOUTS = {
    ORBAX_MARKER: {*CONFIG_FILES, *TOKENIZER_FILES, ORBAX_MARKER, ORBAX_PARAMS + "/"},
    "model_index.json": {*CONFIG_FILES, *TOKENIZER_FILES, *(f"{c}/{f}" for c, f in WEIGHT_FILES.items())},
    DELTA_MARKER: {DELTA_MARKER, DELTA_FILE},
    LORA_MARKER: {LORA_MARKER, LORA_FILE},
}


def _files_under(root: Path) -> list[str]:
    """Every file and symlink under ``root``, relative and with "/" separators (empty folders are not)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        found += [Path(dirpath, n).relative_to(root).as_posix() for n in files + links]
    return sorted(found)


def foreign_reason(path: Path) -> str | None:
    """None when ``overwrite`` may replace ``path``: an empty folder, a folder holding only what one of our
    formats writes, or a safetensors file we wrote; otherwise why not, in a few words."""
    if not path.is_dir() or path.is_symlink():
        return safefiles.foreign_file_reason(path)
    files = _files_under(path)
    marker = next((m for m in OWN_LAYOUTS if m in files), None)
    if files and marker is None:
        return f"it is not a folder save_pretrained wrote (it has no {' / '.join(OWN_LAYOUTS)})"
    layout = OWN_LAYOUTS.get(marker, set())
    trees = tuple(name for name in layout if name.endswith("/"))
    foreign = [f for f in files if f not in layout and not f.startswith(trees)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"it holds {foreign[0]}{more}, which save_pretrained did not write"
    return None


def source_dtype(sd: StableDiffusion, comp: str, key: str, override: Any = None) -> np.dtype:
    """The dtype ``key`` of component ``comp`` had in the source file (float32 for in-memory models)."""
    if override is not None:
        return np.dtype(override)
    info = sd.source.components.get(comp)
    name = info["dtypes"].get(info.get("key_prefix", "") + key) if info else None
    return safefiles.numpy_dtype(name) if name else np.dtype(np.float32)


# model_index.json entries that name the components a folder of ours holds; any other component the source
# listed (safety checker, feature extractor, image encoder) is not written, so it becomes [null, null]
OWN_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")


def _source_config(sd: StableDiffusion, comp: str) -> dict[str, Any]:
    """The config JSON ``comp`` had in the source files (empty for a model built in memory)."""
    if comp == "model_index":
        return dict(sd.config.model_index)
    raw = sd.source.components.get(comp, {}).get("config")
    return dict(raw) if isinstance(raw, dict) else {}


def _model_index(sd: StableDiffusion) -> dict[str, Any]:
    sched = sd.scheduler_config.class_name or DEFAULT_CLASS
    source = _source_config(sd, "model_index")
    dropped = {
        k: [None, None]
        for k, v in source.items()
        if not k.startswith("_") and k not in OWN_COMPONENTS and isinstance(v, list) and len(v) == 2
    }
    return {
        **source,
        **dropped,
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", sched],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def config_files(sd: StableDiffusion) -> dict[str, dict[str, Any]]:
    """Relative path -> JSON of each config file of a diffusers folder: the source's file with every field we
    model set to the model's value (any other field, ``dtype`` included, written back as it was). A text
    encoder config without a dtype gets ``float32``, so transformers loads it beside diffusers' fp32 UNet."""
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    sched = {
        **_source_config(sd, "scheduler"),
        "_class_name": DEFAULT_CLASS,
        **version,
        **sd.scheduler_config.to_dict(),
    }
    text = {
        **_source_config(sd, "text_encoder"),
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **sd.config.text_encoder.to_dict(),
    }
    if "dtype" not in text and "torch_dtype" not in text:
        text["dtype"] = "float32"
    return {
        "model_index.json": _model_index(sd),
        "unet/config.json": {
            **_source_config(sd, "unet"),
            "_class_name": "UNet2DConditionModel",
            **version,
            **sd.config.unet.to_dict(),
        },
        "vae/config.json": {
            **_source_config(sd, "vae"),
            "_class_name": "AutoencoderKL",
            **version,
            **sd.config.vae.to_dict(),
        },
        "text_encoder/config.json": text,
        "scheduler/scheduler_config.json": sched,
    }


def single_file_metadata(sd: StableDiffusion) -> dict[str, str]:
    """What a single file of ours carries so it loads alone: the diffusers folder's configs (by component)
    and the fingerprint of its tokenizer (the file holds no tokenizer), as one JSON string."""
    files = config_files(sd)
    configs: dict[str, Any] = {name: files[rel] for name, rel in CONFIG_PATHS.items()}
    configs["tokenizer"] = {"fingerprint": tokenizer_fingerprint(sd.tokenizer)}
    return {SINGLE_FILE_CONFIGS: json.dumps(configs, sort_keys=True, separators=(",", ":"))}


def _write_configs_and_tokenizer(sd: StableDiffusion, root: Path) -> None:
    for rel, obj in config_files(sd).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        safefiles.write_json(root / rel, obj)
    try:
        sd.tokenizer.save_pretrained(str(root / "tokenizer"))
    except OSError:
        raise
    except Exception as e:  # the tokenizers library reports a failed write as a bare Exception
        raise OSError(_first_line(e)) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _component_header(
    sd: StableDiffusion, comp: str, dtype: Any
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(file key, shape, dtype) of a component's weight file, in the key form and dtypes of its source."""
    info = sd.source.components.get(comp, {})
    prefix = info.get("key_prefix", "")
    model = getattr(sd, comp)
    header = [(prefix + k, s, source_dtype(sd, comp, k, dtype)) for k, s in state_dict_shapes(model).items()]
    if prefix + POSITION_IDS in info.get("dtypes", {}):  # a buffer some files carry: write it back
        n = sd.config.text_encoder.max_position_embeddings
        header.append((prefix + POSITION_IDS, (1, n), source_dtype(sd, comp, POSITION_IDS)))
    return header


def _component_tensors(sd: StableDiffusion, comp: str) -> Iterator[tuple[str, np.ndarray]]:
    info = sd.source.components.get(comp, {})
    prefix = info.get("key_prefix", "")
    for key, arr in iter_state_dict(getattr(sd, comp)):
        yield prefix + key, arr
    if prefix + POSITION_IDS in info.get("dtypes", {}):
        yield prefix + POSITION_IDS, np.arange(sd.config.text_encoder.max_position_embeddings)[None]


def _write_diffusers(sd: StableDiffusion, root: Path, dtype: Any) -> None:
    _write_configs_and_tokenizer(sd, root)
    for comp in COMPONENTS:
        safefiles.write_safetensors(
            root / comp / WEIGHT_FILES[comp],
            _component_header(sd, comp, dtype),
            lambda comp=comp: _component_tensors(sd, comp),
        )


def _write_single_file(sd: StableDiffusion, path: Path, dtype: Any) -> None:
    """The CompVis layout through ``compvis.py``'s table, streamed one tensor at a time (OpenCLIP's fused
    q/k/v, SD v2.x's, once its three parts have come by)."""
    cfgs = (sd.config.unet.to_dict(), sd.config.vae.to_dict(), sd.config.text_encoder.to_dict())
    entries = compvis_entries(*cfgs)
    header = []
    for cv, dfs, _, shape in entries:
        comp, key = dfs[0].split(".", 1)
        header.append((cv, shape, source_dtype(sd, comp, key, dtype)))
    by_df = {df: (cv, rule, dfs) for cv, dfs, rule, _ in entries for df in dfs}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        pending: dict[str, dict[str, np.ndarray]] = {}
        for comp in COMPONENTS:
            for key, arr in iter_state_dict(getattr(sd, comp)):
                cv, rule, dfs = by_df[f"{comp}.{key}"]
                parts = pending.setdefault(cv, {})
                parts[f"{comp}.{key}"] = arr
                if len(parts) == len(dfs):
                    del pending[cv]
                    yield cv, to_compvis_tensor(rule, [parts[df] for df in dfs])

    safefiles.write_safetensors(path, header, tensors, metadata=single_file_metadata(sd))


def _check_finite(params: dict[str, Any], root: Path) -> None:
    """Refuse NaN/inf params before orbax writes them, naming the first (safetensors checks as it streams)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not np.isfinite(np.asarray(leaf)).all():
            key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            raise ValueError(f"{root}: param {key!r} holds NaN or inf values; not written")


@contextlib.contextmanager
def _stderr_held() -> Iterator[dict[str, bool]]:
    """Hold what the block writes to stderr (``sys.stderr`` and file descriptor 2, which C++ threads use):
    replayed after it, unless the block sets ``state["drop"]``. A failed orbax write prints thousands of
    lines of tracebacks from its worker threads; the caller's one error line says what happened."""
    state = {"drop": False}
    sys.stderr.flush()
    saved_fd, saved_stream, text = os.dup(2), sys.stderr, io.StringIO()
    hook, unraisable = sys.unraisablehook, []
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        sys.stderr, sys.unraisablehook = text, unraisable.append
        try:
            yield state
        finally:
            sys.stderr, sys.unraisablehook = saved_stream, hook
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if not state["drop"]:
                held.seek(0)
                saved_stream.write(text.getvalue() + held.read().decode(errors="replace"))
                for args in unraisable:
                    hook(args)


class _DropFailedWrites(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of a failed orbax write into ``tmp``: its
    worker loops still hold such futures and log each one, with a traceback, when it is collected later."""

    def __init__(self, tmp: Path):
        super().__init__()
        self.tmp = str(tmp.resolve())

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not ("never retrieved" in text and self.tmp in text)


def _silence_failed_futures(tmp: Path) -> None:
    logging.getLogger("asyncio").addFilter(_DropFailedWrites(tmp))
    warnings.filterwarnings("ignore", "coroutine 'async_serialize_from_host", RuntimeWarning)


def _orbax_reason(e: BaseException, tmp: Path, dest: Path) -> str:
    """One line for an orbax failure: the disk being full said plainly, else orbax's first line with our
    hidden temporary's path replaced by the destination."""
    text = str(e)
    if "No space left on device" in text or "os_error_code='28'" in text:
        return "No space left on device"
    return _first_line(e).replace(str(tmp.resolve()), str(dest)).replace(str(tmp), str(dest))[:300]


def _write_orbax(sd: StableDiffusion, root: Path, dest: Path) -> None:
    """Configs and tokenizer as in a diffusers folder; params (memory layout and dtype) as one checkpoint.
    ``dest`` is the path the user asked for, named in errors instead of the temporary ``root``."""
    import orbax.checkpoint as ocp

    _write_configs_and_tokenizer(sd, root)
    params = {comp: nnx.to_pure_dict(nnx.state(getattr(sd, comp), nnx.Param)) for comp in COMPONENTS}
    _check_finite(params, root)
    reason = None
    with _stderr_held() as held:
        try:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save((root / ORBAX_PARAMS).resolve(), params)
                ckptr.wait_until_finished()
        except Exception as e:  # orbax and tensorstore raise ValueError, RuntimeError, OSError...
            reason = _orbax_reason(e, root, dest)
        if reason is not None:  # orbax's failed futures log as they are collected: while held, and dropped
            held["drop"] = True
            gc.collect()
    if reason is not None:
        _silence_failed_futures(root)
        raise SaveError(f"writing {dest} failed (orbax: {reason}); nothing was written there")
    # the source's key forms and dtypes travel along, so a later diffusers export writes them again
    meta = {"format": "jax_erasepro.orbax", "version": 1, "source_components": sd.source.components}
    safefiles.write_json(root / ORBAX_MARKER, meta)


def save_pretrained(
    sd: StableDiffusion,
    out: str | Path,
    *,
    format: str = "diffusers",
    overwrite: bool = False,
    dtype: Any = None,
    base: StableDiffusion | None = None,
    edited_keys: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    lora_rtol: float = 1e-6,
) -> Path:
    """Write ``sd`` to ``out`` in ``format`` (one of FORMATS); returns the written path.

    ``dtype`` overrides the source dtypes (diffusers/single_file). ``delta`` and ``lora`` need ``base``
    (the unedited model) and take the changed tensors from an exact comparison with it, or ``edited_keys``
    (``"unet.<diffusers key>"`` etc.); ``metadata`` (e.g. ``{"method": "uce"}``) is recorded beside them;
    ``lora_rtol`` is the relative Frobenius error allowed per LoRA factorisation. Atomic; never overwrites
    the source model (nor a file it reads through a symlink), nor a non-empty ``out`` unless ``overwrite``;
    ``overwrite`` replaces only an output of ours (``foreign_reason``), never a folder with other files.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (one of {', '.join(FORMATS)})")
    if format in ("delta", "lora") and base is None:
        raise ValueError(f"format={format!r} needs base= (the model the edit started from)")
    protected = [p for p in (sd.source.path, base.source.path if base else None) if p]
    dest = safefiles.check_destination(Path(out), protected, overwrite, foreign_reason)
    if format == "single_file" and dest.suffix != ".safetensors":
        raise ValueError(f"a single file is written as .safetensors, got {dest.name!r}")
    is_dir = format != "single_file"
    with safefiles.atomic_output(dest, is_dir=is_dir, overwrite=overwrite, replaceable=foreign_reason) as tmp:
        if format == "diffusers":
            _write_diffusers(sd, tmp, dtype)
        elif format == "single_file":
            _write_single_file(sd, tmp, dtype)
        elif format == "orbax":
            _write_orbax(sd, tmp, dest)
        elif format == "delta":
            write_delta(sd, base, tmp, edited_keys=edited_keys, metadata=metadata)
        else:
            write_lora(sd, base, tmp, edited_keys=edited_keys, metadata=metadata, rtol=lora_rtol)
    return dest
