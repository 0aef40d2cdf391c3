"""The one training loop every model here shares: optax AdamW, a jitted step, orbax checkpoints, resume.

Data comes from ``batches(step)``, and the step's random key is ``fold_in(key(seed), step)``, so a run
killed and resumed from its last checkpoint computes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

# loss_fn(model, batch, key) -> loss, or (loss, {name: scalar}) to log more than the loss
LossFn = Callable[[nnx.Module, Any, jax.Array], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run: AdamW with linear warmup then cosine decay to ``lr * end_lr_ratio``, clipped gradients."""

    steps: int
    batch_size: int = 64  # read by the batch function that goes with this config, not by train()
    lr: float = 1e-3
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # applied to matrices and embeddings only, not to biases and norm scales
    grad_clip: float | None = 1.0  # global gradient norm
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    ckpt_dir: str | None = None
    ema_decay: float | None = None  # keep an exponential moving average of the trained params


def schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate by step: linear warmup from 0 to ``lr``, then cosine decay to ``lr * end_lr_ratio``."""
    decay_steps = max(config.steps, config.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup_steps, decay_steps, config.lr * config.end_lr_ratio
    )


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The config's optax chain: optional global-norm clipping, then AdamW on ``schedule(config)``."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule(config), weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


def _checkpoints(config: TrainConfig) -> ocp.CheckpointManager:
    # synchronous saves: the step donates its buffers, which an async save could still be reading
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(config.ckpt_dir).absolute(), options=options)


def latest_step(ckpt_dir: str | Path) -> int | None:
    """The last step saved in a run's checkpoint folder (None when it holds none)."""
    if not Path(ckpt_dir).is_dir():
        return None
    with ocp.CheckpointManager(Path(ckpt_dir).absolute()) as manager:
        return manager.latest_step()


def train(
    model: nnx.Module,
    loss_fn: LossFn,
    batches: Callable[[int], Any],
    config: TrainConfig,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> nnx.Module:
    """Train ``model`` in place for ``config.steps`` steps, resuming from ``config.ckpt_dir`` if it has one.

    Only ``wrt`` variables are trained. Returns the model; with ``ema_decay`` its trained params are the EMA.
    ``on_log(step, metrics)`` gets the host-side metrics (``loss``, ``lr``, the loss_fn's extras) every
    ``log_every`` steps; a non-finite loss raises FloatingPointError there.
    """
    tx = optimizer(config)
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    graphdef, state = nnx.split((model, opt))
    ema = jax.tree.map(jnp.copy, nnx.state(model, wrt)) if config.ema_decay is not None else None
    lr = schedule(config)

    def with_aux(m: nnx.Module, batch: Any, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = loss_fn(m, batch, key)
        return out if isinstance(out, tuple) else (out, {})

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step_fn(state: nnx.State, ema: nnx.State | None, batch: Any, step: jax.Array):
        m, o = nnx.merge(graphdef, state)
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        grad_fn = nnx.value_and_grad(with_aux, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (loss, metrics), grads = grad_fn(m, batch, key)
        o.update(m, grads)
        if ema is not None:
            d = config.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, nnx.state(m, wrt))
        return nnx.state((m, o)), ema, {"loss": loss, **metrics}

    manager = _checkpoints(config) if config.ckpt_dir else None
    start = 0
    if manager is not None and manager.latest_step() is not None:
        start = manager.latest_step()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"state": state, "ema": ema})
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
        state, ema = restored["state"], restored["ema"]

    with ThreadPoolExecutor(1) as pool, tqdm(total=config.steps, initial=start, dynamic_ncols=True) as bar:
        pending = pool.submit(batches, start) if start < config.steps else None
        for step in range(start, config.steps):
            batch = pending.result()
            if step + 1 < config.steps:  # render the next batch while this step runs
                pending = pool.submit(batches, step + 1)
            state, ema, metrics = step_fn(state, ema, batch, jnp.asarray(step, jnp.int32))
            done = step + 1
            if manager is not None and (done % config.ckpt_every == 0 or done == config.steps):
                manager.save(done, args=ocp.args.StandardSave({"state": state, "ema": ema}))
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                logged = {k: float(v) for k, v in metrics.items()} | {"lr": float(lr(step))}
                if not np.isfinite(logged["loss"]):
                    raise FloatingPointError(f"loss is {logged['loss']} at step {done}")
                bar.set_postfix(loss=f"{logged['loss']:.4g}")
                if on_log is not None:
                    on_log(done, logged)
    if manager is not None:
        manager.close()
    nnx.update(model, state[0])
    if ema is not None:
        nnx.update(model, ema)
    return model
