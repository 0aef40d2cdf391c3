"""Read a pickled PyTorch checkpoint (.ckpt/.bin/.pt) as numpy, never running code from the file.

Only ``torch.load(..., weights_only=True)`` is used: a pickle that needs anything beyond tensors and
plain containers is refused with a one-line error. Run as ``python -m convert.ckpt IN.ckpt OUT.safetensors``;
the output is written atomically by jax-erasepro's writer, never onto the input, and replaces an existing
file only with ``--overwrite`` and only if that file is one we wrote.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from jax_erasepro import safefiles
from jax_erasepro.weights import WeightsError


class _TrainerCallback:
    """Inert stand-in for the Lightning ``ModelCheckpoint`` class that CompVis training files pickle.

    Real SD v1 ``.ckpt`` files keep it (as a dict key under ``callbacks``); it carries no weights.
    """


# name in the pickle -> the inert class it loads as (the real class is never imported)
_STAND_INS = [(_TrainerCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def _to_numpy(key: str, value: object, path: Path) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
    t = value.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, exactly
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_ckpt(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a pickled checkpoint (``state_dict`` taken if nested) as numpy arrays."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found[1]})" if found else ""
        raise WeightsError(
            f"refusing to unpickle {path}: it needs arbitrary code execution{what}; "
            "convert it to safetensors in a trusted environment"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {str(k): _to_numpy(str(k), v, path) for k, v in obj.items()}


def write_safetensors(tensors: dict[str, np.ndarray], dst: Path, overwrite: bool = False) -> None:
    """Write ``tensors`` to ``dst`` atomically (no NaN/inf; an existing ``dst`` only with ``overwrite``)."""
    unsupported = [k for k, v in tensors.items() if v.dtype not in safefiles.SAFETENSORS_NAMES]
    if unsupported:
        key = unsupported[0]
        raise WeightsError(f"{dst}: tensor {key!r} is {tensors[key].dtype}, a dtype we do not write")
    header = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    with safefiles.atomic_output(dst, is_dir=False, overwrite=overwrite) as tmp:
        safefiles.write_safetensors(tmp, header, lambda: iter(tensors.items()))


def main(argv: list[str] | None = None) -> None:
    """Convert one pickled checkpoint to a safetensors file with the same keys."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an output written earlier by us")
    args = parser.parse_args(argv)
    if args.dst.suffix != ".safetensors":
        parser.error(f"the output is a safetensors file: name it *.safetensors, not {args.dst.name!r}")
    try:
        dst = safefiles.check_destination(args.dst, [args.src], args.overwrite)
        tensors = {k: np.ascontiguousarray(v) for k, v in load_ckpt(args.src).items()}
        write_safetensors(tensors, dst, args.overwrite)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    print(f"wrote {len(tensors)} tensors to {dst}")


if __name__ == "__main__":
    main()
