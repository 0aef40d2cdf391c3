"""The fine-tuning engine: AdamW as torch computes it, resuming a checkpoint, a non-finite loss, splits."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_erasepro import surgery
from jax_erasepro.erase import EraseError, erase, finetune
from jax_erasepro.tiny import tiny_random_sd

FAST = dict(steps=4, ddim_steps=4, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=7)


def test_adamw_with_clipping_is_torchs():
    """Three updates of optimizer(clip) + apply(lr, weight_decay) equal torch's clip_grad_norm_ + AdamW."""
    import torch

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (0.3, 5.0, 1.0)]
    tx = finetune.optimizer(max_grad_norm=1.0)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g in grads:
        params, state = finetune.apply(tx, params, {"w": jnp.asarray(g)}, state, jnp.float32(1e-2), 1e-2)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-2)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_ends_on_the_weights_of_an_unbroken_one(sd, tmp_path):
    keys = surgery.select(sd, "unet.*attn2*")
    straight, _ = erase(sd, "cat", "", method="esd-x", **FAST)
    ckpt = str(tmp_path / "ckpt")
    half, r_half = erase(
        sd, "cat", "", method="esd-x", **{**FAST, "steps": 2}, checkpoint_dir=ckpt, checkpoint_every=1
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_2"]
    resumed, report = erase(sd, "cat", "", method="esd-x", **FAST, checkpoint_dir=ckpt, checkpoint_every=1)
    assert report.training["steps_run"] == 4 and any(
        "resumed from the checkpoint at step 2" in n for n in report.notes
    )
    assert report.training["loss"][:2] == r_half.training["loss"]
    assert report.training["t_enc"][:2] == r_half.training["t_enc"] and len(report.training["t_enc"]) == 4
    a, b = surgery.read(straight, keys), surgery.read(resumed, keys)
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(EraseError, match="holds checkpoints of another run"):
        erase(sd, "dog", "", method="esd-x", **FAST, checkpoint_dir=ckpt)
    with pytest.raises(EraseError, match="holds checkpoints of another run"):  # another model, same request
        erase(straight, "cat", "", method="esd-x", **FAST, checkpoint_dir=ckpt)
    with pytest.raises(EraseError, match="holds a run at step 4, beyond steps=3; give steps >= 4"):
        erase(sd, "cat", "", method="esd-x", **{**FAST, "steps": 3}, checkpoint_dir=ckpt)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    with pytest.raises(EraseError, match="is not empty and holds no run.json of ours"):
        erase(sd, "cat", "", method="esd-x", **FAST, checkpoint_dir=str(tmp_path / "other"))
    assert (tmp_path / "other" / "mine.txt").read_text() == "x"


def test_a_non_finite_loss_stops_and_keeps_the_last_good_weights():
    def step(params, state, i):
        new = {"w": params["w"] + 1.0}
        return new, state, jnp.float32(np.nan if i == 2 else 1.0), {"t": i}

    with pytest.warns(RuntimeWarning, match="the loss was nan at step 2"):
        result = finetune.train(step, {"w": jnp.zeros(())}, (), steps=5, name="toy", progress=False)
    assert float(result.trainable["w"]) == 2.0 and result.losses == [1.0, 1.0] and result.aux == {"t": [0, 1]}
    assert "stopped there" in result.stopped


def test_a_split_takes_its_set_and_an_empty_set_is_one_line(sd):
    split = finetune.split_trainable(sd, "text_encoder", lambda k: ".mlp." in k)
    assert split.keys and all(".mlp." in k and k.startswith("text_encoder.") for k in split.keys)
    change = finetune.relative_change(sd, split, split.trainable, split.trainable)
    assert set(change) == set(split.keys) and not any(change.values())  # stacked layers apart
    with pytest.raises(EraseError, match="no parameter of the unet matches the trainable set 'nothing'"):

        def nothing(k):
            return False

        finetune.split_trainable(sd, "unet", nothing)


DATA_PARALLEL = """
import json, numpy as np, jax
from jax_erasepro import surgery
from jax_erasepro.erase import erase
from jax_erasepro.tiny import tiny_random_sd
sd = tiny_random_sd(seed=7)
runs = {"ac": dict(steps=2, anchor_images=4, batch_size=4, generation_steps=2)}
out = {"devices": jax.device_count()}
for method, kw in runs.items():
    one, r1 = erase(sd, "cat", "dog", method=method, progress=False, **kw)
    n = -1 if method == "ac" else 2
    split, report = erase(sd, "cat", "dog", method=method, progress=False, data_parallel=n, **kw)
    keys = report.edited
    a, b = surgery.read(one, keys), surgery.read(split, keys)
    lr = report.options.get("effective_lr", report.options["lr"])
    out[method] = {
        "loss": float(np.max(np.abs(np.subtract(r1.training["loss"], report.training["loss"])))),
        "loss_scale": float(np.max(np.abs(r1.training["loss"]))),
        "weights_in_lr": max(float(np.abs(a[k] - b[k]).max()) for k in keys) / (lr * kw["steps"]),
    }
try:
    kw = {**runs["ac"], "batch_size": 3}
    erase(sd, "cat", "dog", method="ac", progress=False, data_parallel=2, **kw)
except Exception as e:
    out["error"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_data_parallel_steps_on_a_mesh_equal_one_device():
    """AC's batch split over 4 CPU devices (every method places its batch through the same
    ``finetune.batch_sharding``/``constrain``/``replicate``) runs the same steps as one device: the same
    losses (float32 reduction order aside) and weights within Adam's bound (an update moves a weight by at
    most about lr, so two runs whose gradients differ only in rounding, which can flip the sign of a
    near-zero gradient, stay within 2 lr per step); a batch that does not split is one line."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT") :])
    assert out["devices"] == 4
    for method in ("ac",):
        got = out[method]
        assert got["loss"] <= 1e-4 * got["loss_scale"], (method, got)
        assert got["weights_in_lr"] <= 2.0, (method, got)
    assert out["error"] == "batch size 3 does not split over data_parallel=2 devices"
