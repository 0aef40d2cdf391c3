"""What the shapes-sd training scripts share: their run-folder CLI and one diffusers component on disk."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import IO, Any

from flax import nnx
from safetensors.numpy import save_file

from jax_erasepro.loading import SafetensorsReader
from jax_erasepro.models.config import JsonConfig
from jax_erasepro.saving import DIFFUSERS_VERSION
from jax_erasepro.weights import abstract_model, load_state_dict, to_state_dict
from recipes.shapes_sd.training import TrainConfig, latest_step

WEIGHTS = "diffusion_pytorch_model.safetensors"


def run_parser(
    description: str | None,
    *,
    steps: int,
    batch_size: int,
    sizes: tuple[str, ...] = ("small", "tiny"),
) -> argparse.ArgumentParser:
    """The flags every training CLI takes: --out --steps --seed --resume --size --batch-size --lr --workers
    --export-only."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="run folder: checkpoints in OUT/ckpt, exports in OUT")
    parser.add_argument("--steps", type=int, default=steps, help="also sets the learning-rate schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run OUT/ckpt holds")
    parser.add_argument("--size", choices=sizes, default=sizes[0], help="model config (default %(default)s)")
    parser.add_argument("--batch-size", type=int, help=f"override the recipe's {batch_size}")
    parser.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    parser.add_argument(
        "--workers", type=int, default=0,
        help="processes that render batches ahead (for accelerators; the same batches for any number)",
    )
    parser.add_argument(
        "--export-only", action="store_true",
        help="train no further: export (and evaluate) the last checkpoint in OUT/ckpt, EMA weights if any",
    )
    return parser


def prepare_run(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: TrainConfig
) -> TrainConfig:
    """Apply --batch-size and --lr, refuse to overwrite a run without --resume, create the checkpoint folder;
    with --export-only, stop the run at its last checkpoint."""
    if args.batch_size:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    if args.lr:
        config = dataclasses.replace(config, lr=args.lr)
    ckpt = Path(config.ckpt_dir)
    if args.export_only:
        step = latest_step(ckpt)
        if step is None:
            parser.error(f"--export-only: {ckpt} holds no checkpoint")
        return dataclasses.replace(config, steps=step)
    if ckpt.exists() and any(ckpt.iterdir()) and not args.resume:
        parser.error(f"{ckpt} already holds a run: pass --resume to continue it, or choose another --out")
    ckpt.mkdir(parents=True, exist_ok=True)
    return config


def log_line(log: IO[str], step: int, metrics: dict[str, float]) -> None:
    """Append one JSON line of training metrics and the wall-clock time (the ``on_log`` of
    ``training.train``), so a run's log gives its throughput."""
    log.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
    log.flush()


def export_component(model: nnx.Module, out: str | Path, class_name: str) -> Path:
    """Write one diffusers component folder (config.json + fp32 safetensors)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **model.config.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_state_dict(model), str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def load_component(cls: Any, config_cls: type[JsonConfig], folder: str | Path) -> nnx.Module:
    """A diffusers component folder (as ``export_component`` writes it) -> our module."""
    folder = Path(folder)
    config = config_cls.from_json(folder / "config.json")
    reader = SafetensorsReader(folder / WEIGHTS)
    return load_state_dict(
        abstract_model(cls, config), reader.__getitem__, reader.keys, source=str(folder / WEIGHTS)
    )
