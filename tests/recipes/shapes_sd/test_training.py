"""The shared training loop: it learns, resumes bit-exactly, and keeps only complete checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recipes.shapes_sd.runs import prepare_run, run_parser
from recipes.shapes_sd.training import TrainConfig, latest_step, schedule, train

W = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


class Toy(nnx.Module):
    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.tanh(self.layers[0](x)))


def batches(step: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(step).normal(size=(32, 4)).astype(np.float32)
    return {"x": x, "y": x @ W}


def loss_fn(model, batch, key):
    noise = 0.01 * jax.random.normal(key, batch["y"].shape)  # uses the step key, so resume must replay it
    return jnp.mean((model(batch["x"]) - batch["y"] - noise) ** 2), {"scale": jnp.abs(batch["y"]).mean()}


def params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


class Stop(Exception):
    pass


def stop_at(step: int):
    def on_log(done: int, metrics: dict) -> None:
        if done == step:
            raise Stop

    return on_log


def test_loss_decreases():
    logs = []
    cfg = TrainConfig(steps=300, lr=3e-2, warmup_steps=20, log_every=10, weight_decay=1e-4)
    train(Toy(), loss_fn, batches, cfg, on_log=lambda s, m: logs.append(m))
    assert set(logs[0]) == {"loss", "lr", "scale"}
    first, last = np.mean([m["loss"] for m in logs[:2]]), np.mean([m["loss"] for m in logs[-3:]])
    assert last < 0.05 * first, (first, last)


def test_schedule_warmup_then_cosine():
    lr = schedule(TrainConfig(steps=100, lr=1.0, warmup_steps=10, end_lr_ratio=0.1))
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.1)
    values = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_equals_straight_run(tmp_path, ema_decay):
    cfg = TrainConfig(steps=20, lr=1e-2, log_every=5, ckpt_every=5, ema_decay=ema_decay)
    straight = train(Toy(), loss_fn, batches, cfg)

    resumed_cfg = dataclasses.replace(cfg, ckpt_dir=str(tmp_path))
    with pytest.raises(Stop):  # a run killed right after its step-10 checkpoint
        train(Toy(), loss_fn, batches, resumed_cfg, on_log=stop_at(10))
    # a fresh process rebuilds a differently initialised model; the checkpoint must overwrite all of it
    resumed = train(Toy(seed=1), loss_fn, batches, resumed_cfg)

    for a, b in zip(params(straight), params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    cfg = TrainConfig(steps=12, lr=1e-2, log_every=4, ckpt_every=4, ckpt_dir=str(tmp_path))
    with pytest.raises(Stop):
        train(Toy(), loss_fn, batches, cfg, on_log=stop_at(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "8"]
    # a save killed half way leaves only a temporary folder, which resuming must not take for a checkpoint
    for name in ("12.orbax-checkpoint-tmp", "12.orbax-checkpoint-tmp-1700000000"):  # orbax's two namings
        (tmp_path / name).mkdir()
        (tmp_path / name / "half_written").write_bytes(b"\0" * 10)
    logs = []
    train(Toy(), loss_fn, batches, cfg, on_log=lambda s, m: logs.append(s))
    assert logs == [12]  # resumed from step 8, not 12 and not 0
    assert {"8", "12"} <= {p.name for p in tmp_path.iterdir()} and not (tmp_path / "4").exists()


def test_finished_run_returns_checkpoint(tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-2, log_every=3, ckpt_every=3, ckpt_dir=str(tmp_path))
    first = train(Toy(), loss_fn, batches, cfg)
    again = train(Toy(seed=2), loss_fn, lambda step: pytest.fail("a finished run draws no batch"), cfg)
    for a, b in zip(params(first), params(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_export_only_stops_at_the_last_checkpoint(tmp_path):
    """--export-only: a run stopped at step 8 of 12 gives its step-8 weights back without drawing a batch."""
    cfg = TrainConfig(steps=12, lr=1e-2, warmup_steps=0, end_lr_ratio=1.0,  # constant: same 8 steps
                      log_every=4, ckpt_every=4, ckpt_dir=str(tmp_path / "ckpt"))
    assert latest_step(tmp_path / "ckpt") is None
    with pytest.raises(Stop):
        train(Toy(), loss_fn, batches, cfg, on_log=stop_at(8))
    assert latest_step(tmp_path / "ckpt") == 8
    parser = run_parser(None, steps=12, batch_size=32)
    at8 = prepare_run(parser, parser.parse_args(["--out", str(tmp_path), "--export-only"]), cfg)
    assert at8.steps == 8
    got = train(Toy(seed=3), loss_fn, lambda step: pytest.fail("export draws no batch"), at8)
    want = train(Toy(), loss_fn, batches, dataclasses.replace(cfg, steps=8, ckpt_dir=None))
    for a, b in zip(params(want), params(got), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit):  # nothing to export
        prepare_run(parser, parser.parse_args(["--out", "x", "--export-only"]),
                    dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "none")))


def test_non_finite_loss_raises():
    cfg = TrainConfig(steps=3, log_every=1)
    with pytest.raises(FloatingPointError, match="step 1"):
        train(Toy(), lambda m, b, k: jnp.mean(m(b["x"])) * jnp.nan, batches, cfg)


def test_ema_limits():
    cfg = TrainConfig(steps=5, lr=1e-2, log_every=5)
    raw = params(train(Toy(), loss_fn, batches, cfg))
    ema0 = params(train(Toy(), loss_fn, batches, dataclasses.replace(cfg, ema_decay=0.0)))
    ema1 = params(train(Toy(), loss_fn, batches, dataclasses.replace(cfg, ema_decay=1.0)))
    for r, e0, e1, init in zip(raw, ema0, ema1, params(Toy()), strict=True):
        np.testing.assert_array_equal(e0, r)  # decay 0: the average is the latest params
        np.testing.assert_array_equal(e1, init)  # decay 1: it never moves
        assert not np.array_equal(r, init)


def test_prepare_run_overrides_batch_size_and_lr(tmp_path):
    """--batch-size and --lr replace the recipe's values; without them the recipe stands."""
    cfg = TrainConfig(steps=4, batch_size=32, lr=4e-4, ckpt_dir=str(tmp_path / "a"))
    parser = run_parser(None, steps=4, batch_size=32)
    got = prepare_run(parser, parser.parse_args(["--out", "x", "--batch-size", "8", "--lr", "2e-4"]), cfg)
    assert (got.batch_size, got.lr) == (8, 2e-4)
    cfg = dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "b"))
    assert prepare_run(parser, parser.parse_args(["--out", "x"]), cfg) == cfg
