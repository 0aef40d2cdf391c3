"""The fine-tuning engine the training methods share: the trainable split, optimiser, loop and report.

A method supplies one jitted step ``(trainable, opt_state, i) -> (trainable, opt_state, loss, aux)`` whose
frozen inputs (the original weights, the rest of the network, schedules, prompt states) are arguments,
not constants closed over. ``train`` runs it with a progress bar (loss, ETA), stops at a non-finite loss
keeping the last good weights, and saves orbax checkpoints a later call with the same ``checkpoint_dir``
resumes from: every draw of step i comes from ``fold_in(seed, i)``, so a resumed run ends on the same
weights as one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jax_erasepro import surgery
from jax_erasepro.erase.methods import Request, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.errors import EraseError
from jax_erasepro.sd import StableDiffusion

Step = Callable[[nnx.State, optax.OptState, int], tuple[nnx.State, optax.OptState, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """Options every fine-tuning method takes (a base for their options dataclasses)."""

    seed: int = option(0, "seed of every draw; one seed gives identical weights")
    progress: bool = option(True, "show a progress bar with the loss and the time left")
    checkpoint_dir: str | None = option(
        None,
        "folder for orbax checkpoints of the training state; a later run with the same folder and request "
        "resumes from the last one (None: no checkpoints)",
    )
    checkpoint_every: int = option(50, "steps between checkpoints (>= 1)")
    data_parallel: int = option(
        1,
        "devices each step's batch is split over, data parallel on a Mesh (1: one device; -1: every device); "
        "the batch size must be a multiple of it",
    )

    def check_loop(self) -> None:
        if self.checkpoint_every < 1:
            raise EraseError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.data_parallel == 0 or self.data_parallel < -1:
            raise EraseError(f"data_parallel must be >= 1 or -1 (every device), got {self.data_parallel}")


def batch_sharding(data_parallel: int, batch: int) -> NamedSharding | None:
    """Where a step's batch rows go: split over ``data_parallel`` devices (a ``data`` Mesh; -1: all of them),
    params replicated; None on one device. EraseError when there are too few devices or the batch does not
    split evenly. Constrained inside the jitted step, XLA all-reduces the gradients."""
    n = jax.device_count() if data_parallel == -1 else data_parallel
    if n == 1:
        return None
    if n > jax.device_count():
        raise EraseError(f"data_parallel={n} but this process sees {jax.device_count()} device(s)")
    if batch % n:
        raise EraseError(f"batch size {batch} does not split over data_parallel={n} devices")
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def replicate(tree: Any, sharding: NamedSharding | None) -> Any:
    """``tree`` placed whole on every device of ``sharding``'s mesh (unchanged when None): a step's frozen
    inputs and its starting state, so each call finds them where it runs and compiles once."""
    if sharding is None:
        return tree
    return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """``x`` with its leading (batch) axis placed by ``sharding`` (unchanged when None)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@dataclasses.dataclass(frozen=True)
class Split:
    """One component's params cut in two: ``trainable`` (the set a method fine-tunes) and ``rest``."""

    component: str  # "unet" or "text_encoder"
    graphdef: nnx.GraphDef
    trainable: nnx.State
    rest: nnx.State
    keys: tuple[str, ...]  # ``<component>.<diffusers key>`` of each trainable tensor

    def merge(self, trainable: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, trainable, self.rest)


def unet_parts(name: str, parts: tuple[str, ...]) -> Callable[[str], bool]:
    """``unet.<key>`` -> whether the key contains one of ``parts`` (a trainable set named ``name``)."""

    def predicate(key: str) -> bool:
        return key.startswith("unet.") and any(p in key for p in parts)

    predicate.__name__ = name
    return predicate


def split_trainable(sd: StableDiffusion, component: str, predicate: Callable[[str], bool]) -> Split:
    """The ``component`` of ``sd`` split by ``predicate`` over its ``<component>.<key>`` names; EraseError
    when nothing matches."""
    keys = tuple(k for k in surgery.select(sd, predicate) if k.startswith(f"{component}."))
    if not keys:
        raise EraseError(f"no parameter of the {component} matches the trainable set {predicate.__name__!r}")
    only = lambda k: k.startswith(f"{component}.") and predicate(k)  # noqa: E731
    graphdef, trainable, rest = nnx.split(
        getattr(sd, component), surgery.param_filter(sd, only, component), ...
    )
    return Split(component, graphdef, trainable, rest, keys)


def optimizer(max_grad_norm: float | None = None) -> optax.GradientTransformation:
    """torch's Adam with its defaults (b1 0.9, b2 0.999, eps 1e-8; AdamW's decoupled decay is ``apply``'s),
    optionally after a global-norm clip; the learning rate is left to ``apply``, so it is a traced
    argument of the step and changing it does not recompile. One object per setting (however it is
    called), so a jitted step that takes it as a static argument compiles once."""
    return _optimizer(None if max_grad_norm is None else float(max_grad_norm))


@functools.cache
def _optimizer(max_grad_norm: float | None) -> optax.GradientTransformation:
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    return optax.chain(*parts, optax.scale_by_adam())


def apply(
    tx: optax.GradientTransformation,
    trainable: nnx.State,
    grads: nnx.State,
    opt_state: optax.OptState,
    lr: jax.Array,
    weight_decay: float = 0.0,
) -> tuple[nnx.State, optax.OptState]:
    """One update: p <- p - lr (adam(g) + weight_decay p), torch's AdamW order (decay on the old p), in
    p's own dtype."""
    updates, opt_state = tx.update(grads, opt_state)
    new = jax.tree.map(lambda p, u: (p - lr * (u + weight_decay * p)).astype(p.dtype), trainable, updates)
    return new, opt_state


@dataclasses.dataclass
class Result:
    """What ``train`` ran: the final trainable params, losses and per-step extras, why it stopped."""

    trainable: nnx.State
    losses: list[float]
    aux: dict[str, list[float]]
    stopped: str | None
    resumed_from: int
    timings: dict[str, float]


class Checkpoints:
    """Orbax checkpoints of (trainable, opt_state, losses) under ``folder/step_<i>``, with the run's
    fingerprint beside them so a different request never resumes from them."""

    def __init__(self, folder: str | Path, every: int, fingerprint: Mapping[str, Any]):
        self.folder, self.every = Path(folder).expanduser().absolute(), every
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]

    def _marker(self) -> Path:
        return self.folder / "run.json"

    def latest(self) -> int | None:
        """The last complete step saved for this run (None: none); EraseError for another run's folder."""
        if not self.folder.exists():
            return None
        marker = self._marker()
        if not marker.exists():
            if any(self.folder.iterdir()):
                raise EraseError(f"checkpoint_dir {self.folder} is not empty and holds no run.json of ours")
            return None
        try:
            saved = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise EraseError(f"checkpoint_dir {self.folder}: unreadable run.json ({e})") from None
        if saved.get("digest") != self.digest:
            raise EraseError(
                f"checkpoint_dir {self.folder} holds checkpoints of another run (method, request or options "
                "differ); give a new folder"
            )
        steps = [int(p.name[5:]) for p in self.folder.glob("step_*") if (p / "done").exists()]
        return max(steps, default=None)

    def save(
        self,
        step: int,
        trainable: nnx.State,
        opt_state: optax.OptState,
        losses: list[float],
        aux: Mapping[str, list[float]],
    ) -> None:
        """Write ``step_<step>`` (steps completed), then drop older ones."""
        import orbax.checkpoint as ocp

        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._marker().exists():
            self._marker().write_text(json.dumps({"digest": self.digest, "run": self.fingerprint}, indent=1))
        path = self.folder / f"step_{step}"
        if path.exists():
            shutil.rmtree(path)
        leaves = jax.tree.leaves((trainable, opt_state))
        tree = {"leaves": {str(i): np.asarray(x) for i, x in enumerate(leaves)}, "losses": np.asarray(losses)}
        tree |= {f"aux_{k}": np.asarray(v, np.float64) for k, v in aux.items()}
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path / "state", tree)
            ckpt.wait_until_finished()
        (path / "done").write_text(str(step))
        for old in self.folder.glob("step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def restore(
        self, step: int, trainable: nnx.State, opt_state: optax.OptState
    ) -> tuple[nnx.State, optax.OptState, list[float], dict[str, list[float]]]:
        import orbax.checkpoint as ocp

        like = (trainable, opt_state)
        leaves, treedef = jax.tree.flatten(like)
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(self.folder / f"step_{step}" / "state")
        misfit = EraseError(f"checkpoint {self.folder}/step_{step} does not fit this model's trainable set")
        if len(tree["leaves"]) != len(leaves):
            raise misfit
        saved = [tree["leaves"][str(i)] for i in range(len(leaves))]
        if any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves, strict=True)):
            raise misfit
        restored = [
            jax.device_put(np.asarray(a, b.dtype), getattr(b, "sharding", None))
            for a, b in zip(saved, leaves, strict=True)
        ]
        trainable, opt_state = jax.tree.unflatten(treedef, restored)
        aux = {
            k[4:]: [float(x) for x in np.asarray(v).reshape(-1)]
            for k, v in tree.items()
            if k.startswith("aux_")
        }
        return trainable, opt_state, [float(x) for x in np.asarray(tree["losses"]).reshape(-1)], aux


def model_digest(sd: StableDiffusion) -> str:
    """A cheap fingerprint of a model: its configs and, per param, shape, dtype and the exact bytes of an
    evenly strided sample of about 4,096 values (milliseconds even for SD v1.4)."""
    h = hashlib.sha256(repr((sd.config, sd.scheduler_config)).encode())
    for component in ("text_encoder", "unet", "vae"):
        for path, var in nnx.to_flat_state(nnx.state(getattr(sd, component), nnx.Param)):
            x = var[...]
            flat = x.reshape(-1)
            sample = np.asarray(flat[:: max(1, flat.size // 4096)])
            h.update(f"{component}.{path}:{x.shape}:{x.dtype}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def checkpoints_for(
    sd: StableDiffusion, options: Mapping[str, Any], method: str, request: Request, texts: list[str]
) -> Checkpoints | None:
    """The run's ``Checkpoints`` when ``options`` name a ``checkpoint_dir`` (None otherwise); the
    fingerprint is the model (``model_digest``), the method, the request and every option that changes
    the weights (not ``steps``: a run resumes to more steps)."""
    if options.get("checkpoint_dir") is None:
        return None
    skip = {"progress", "checkpoint_dir", "checkpoint_every", "steps", "epochs", "data_parallel"}
    fingerprint = {
        "model": model_digest(sd),
        "method": method,
        "request": dataclasses.asdict(request),
        "prompts": texts,
        "options": {k: v for k, v in options.items() if k not in skip},
    }
    return Checkpoints(options["checkpoint_dir"], options["checkpoint_every"], fingerprint)


def train(
    step: Step,
    trainable: nnx.State,
    opt_state: optax.OptState,
    *,
    steps: int,
    name: str,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> Result:
    """Run ``step`` for ``steps`` optimisation steps from ``trainable``; see the module docstring."""
    t0 = time.perf_counter()
    start, losses, aux = 0, [], {}
    if checkpoints is not None and (done := checkpoints.latest()) is not None:
        if done > steps:
            raise EraseError(
                f"checkpoint_dir {checkpoints.folder} holds a run at step {done}, beyond steps={steps}; "
                f"give steps >= {done} or a new folder"
            )
        trainable, opt_state, losses, aux = checkpoints.restore(done, trainable, opt_state)
        start = done
    stopped, t_first = None, None
    bar = tqdm(
        range(start, steps),
        desc=name,
        unit="step",
        disable=not progress,
        leave=False,
        initial=start,
        total=steps,
    )
    for i in bar:
        new, new_opt, loss, extra = step(trainable, opt_state, i)
        loss = float(loss)
        t_first = t_first or time.perf_counter()
        if not np.isfinite(loss):
            stopped = f"the loss was {loss} at step {i}: stopped there, the model keeps the weights before it"
            break
        if not np.isfinite(float(optax.global_norm(new))):
            stopped = (
                f"step {i}'s update made a weight non-finite: stopped there, the model keeps the weights "
                "before it"
            )
            break
        trainable, opt_state = new, new_opt
        losses.append(loss)
        for k, v in extra.items():
            aux.setdefault(k, []).append(float(v))
        bar.set_postfix(loss=f"{loss:.4g}", **{k: f"{float(v):.3g}" for k, v in extra.items()})
        if checkpoints is not None and ((i + 1) % checkpoints.every == 0 or i + 1 == steps):
            checkpoints.save(i + 1, trainable, opt_state, losses, aux)
    bar.close()
    jax.block_until_ready(trainable)
    t_end = time.perf_counter()
    if stopped:
        warnings.warn(f"{name}: {stopped}", RuntimeWarning, stacklevel=3)
    n = len(losses) - start
    t_first = t_first or t_end
    return Result(
        trainable,
        losses,
        aux,
        stopped,
        start,
        {
            "first_step": t_first - t0,  # the compile (when not cached) and one step
            "train": t_end - t0,
            "per_step": (t_end - t_first) / max(n - 1, 1),
        },
    )


def relative_change(
    sd: StableDiffusion, split: Split, before: nnx.State, after: nnx.State
) -> dict[str, float | None]:
    """||W - W_o|| / ||W_o|| per trainable key, a stacked layer's slice on its own (0 where W did not move;
    None where W_o is 0 and W moved). Each stacked array is read to the host once."""
    table = surgery.entries(sd, [split.component])
    flat_before, flat_after = dict(nnx.to_flat_state(before)), dict(nnx.to_flat_state(after))
    by_path: dict[Any, list[Any]] = {}
    for key in split.keys:
        by_path.setdefault(table[key].path, []).append((key, table[key].layer))
    out: dict[str, float | None] = {}
    for path, keys in by_path.items():
        w0 = np.asarray(flat_before[path][...], np.float64)
        dw = np.asarray(flat_after[path][...], np.float64) - w0
        for key, layer in keys:
            a, d = (w0, dw) if layer is None else (w0[layer], dw[layer])
            diff, norm = float(np.linalg.norm(d)), float(np.linalg.norm(a))
            out[key] = diff / norm if norm > 0 else (0.0 if diff == 0 else None)
    return out


def report(
    sd: StableDiffusion,
    *,
    method: str,
    request: Request,
    texts: list[str],
    options: Mapping[str, Any],
    split: Split,
    original: nnx.State,
    result: Result,
    notes: list[str],
    t0: float,
    t_prep: float,
    extra: Mapping[str, Any] | None = None,
) -> EraseReport:
    """The EraseReport of a fine-tuning run: loss curve, per-key relative change, timings, notes."""
    relative = relative_change(sd, split, original, result.trainable)
    notes = list(notes)
    if result.resumed_from:
        notes.append(f"resumed from the checkpoint at step {result.resumed_from}")
    if result.stopped:
        notes.append(result.stopped)
    return EraseReport(
        method=method,
        targets=list(request.targets),
        anchors=list(request.anchors),
        preserve=list(request.preserve),
        prompts=texts,
        options=dict(options),
        columns={},
        pairs=[],
        layers=[],
        timings={
            "prepare": t_prep - t0,
            **result.timings,
            "total": time.perf_counter() - t0,
        },
        edited=sorted(k for k, v in relative.items() if v is None or v > 0),
        notes=notes,
        training={
            "steps_run": len(result.losses),
            "loss": result.losses,
            **result.aux,
            "trainable": len(split.keys),
            "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(original))),
            "relative_change": relative,
            "stopped": result.stopped,
            **(extra or {}),
        },
    )


__all__ = [
    "Checkpoints",
    "LoopOptions",
    "Result",
    "Split",
    "apply",
    "batch_sharding",
    "checkpoints_for",
    "constrain",
    "model_digest",
    "replicate",
    "optimizer",
    "relative_change",
    "report",
    "split_trainable",
    "train",
    "unet_parts",
]
