"""Mesh placement: the rules table on SD v1.4's real trees, and sharded runs equal to single-device ones.

The sharded runs need 8 devices, which CPU JAX fakes only if XLA_FLAGS is set before jax is imported, so
they run once in a subprocess (``python -m tests.test_sharding OUT``) that saves its results for the tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from jax_erasepro import sharding
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from tests.conftest import SD14, assert_close

ROOT = Path(__file__).parents[1]
MESH_42 = AbstractMesh((4, 2, 1), sharding.MESH_AXES)
TINY_FSDP = sharding.Rules(sharding.FSDP_RULES.table, min_size=0)  # the tiny model's kernels are all small
TENSOR_RULES = sharding.Rules(
    (("batch", sharding.BATCH_AXES), ("linear_out", "tensor"), ("conv_out", "fsdp"), ("vocab", "fsdp"))
)


def _abstract(cls, cfg_cls, name):
    cfg = cfg_cls.from_json(SD14 / name / "config.json")
    return nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)


@pytest.fixture(scope="module")
def sd14_states():
    return {
        "unet": _abstract(UNet2DConditionModel, UNet2DConditionConfig, "unet"),
        "vae": _abstract(AutoencoderKL, AutoencoderKLConfig, "vae"),
        "text_encoder": _abstract(CLIPTextModel, CLIPTextConfig, "text_encoder"),
    }


def _specs(state, mesh, rules) -> dict[str, tuple[tuple[int, ...], PartitionSpec]]:
    shardings = dict(nnx.to_flat_state(sharding.param_shardings(state, mesh, rules)))
    return {".".join(map(str, p)): (tuple(v.shape), shardings[p].spec) for p, v in nnx.to_flat_state(state)}


def test_logical_axes_follow_leaf_and_shape():
    axes = sharding.param_logical_axes
    assert axes(("to_k", "kernel"), (768, 320)) == ("linear_in", "linear_out")
    assert axes(("conv", "kernel"), (3, 3, 4, 320)) == ("conv_h", "conv_w", "conv_in", "conv_out")
    assert axes(("layers", "fc1", "kernel"), (12, 768, 3072)) == ("layers", "linear_in", "linear_out")
    assert axes(("token_embedding", "embedding"), (49408, 768)) == ("vocab", "embed")
    assert axes(("norm", "scale"), (320,)) == (None,)
    assert axes(("layers", "fc1", "bias"), (12, 3072)) == (None, None)


def test_default_rules_replicate_every_param(sd14_states):
    for state in sd14_states.values():
        assert all(
            spec == PartitionSpec() or set(spec) == {None}
            for _, spec in _specs(state, MESH_42, sharding.DEFAULT_RULES).values()
        )


def test_fsdp_rules_shard_the_large_kernels_output_dim(sd14_states):
    rules, fsdp = sharding.FSDP_RULES, MESH_42.shape["fsdp"]
    total = sharded = 0
    for state in sd14_states.values():
        for key, (shape, spec) in _specs(state, MESH_42, rules).items():
            leaf, size = key.rsplit(".", 1)[-1], int(np.prod(shape))
            total += size
            names = sharding.param_logical_axes(tuple(key.split(".")), shape)
            big = leaf in ("kernel", "embedding") and size >= rules.min_size
            out_dim = names.index("vocab") if leaf == "embedding" else len(shape) - 1
            want = [None] * len(shape)
            if big and shape[out_dim] % fsdp == 0:
                want[out_dim] = "fsdp"
                sharded += size
            assert list(spec) + [None] * (len(shape) - len(spec)) == want, key
    # SD v1.4's channels (320, 640, 1280, 768, 128..512) all divide by 2: nearly every weight is split
    assert sharded / total > 0.99


def test_fsdp_rules_shard_sd14_unet_attention_and_convs(sd14_states):
    specs = _specs(sd14_states["unet"], MESH_42, sharding.FSDP_RULES)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel"
    assert specs[k] == ((768, 320), PartitionSpec(None, "fsdp"))
    assert specs["down_blocks.1.resnets.0.conv1.kernel"][1] == PartitionSpec(None, None, None, "fsdp")
    assert specs["conv_in.kernel"][1] == PartitionSpec()  # 3*3*4*320 elements: under min_size
    assert specs["conv_norm_out.scale"][1] == PartitionSpec()
    vae = _specs(sd14_states["vae"], MESH_42, sharding.FSDP_RULES)
    assert vae["decoder.conv_out.kernel"][1] == PartitionSpec()  # 3 output channels do not divide


def test_indivisible_dims_and_used_axes_replicate():
    mesh = AbstractMesh((2, 3, 1), sharding.MESH_AXES)
    rules = sharding.Rules((("linear_in", "fsdp"), ("linear_out", "fsdp")))
    names = ("linear_in", "linear_out")
    assert sharding.logical_spec(names, (4, 6), mesh, rules) == PartitionSpec(None, "fsdp")  # 4 % 3 != 0
    assert sharding.logical_spec(names, (6, 6), mesh, rules) == PartitionSpec("fsdp", None)  # fsdp used once


def test_optimizer_state_gets_its_params_sharding():
    model = nnx.Linear(64, 1024, rngs=nnx.Rngs(0))
    state = nnx.state((model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)))
    shardings = sharding.param_shardings(state, MESH_42, sharding.FSDP_RULES)
    specs = {p: s.spec for p, s in nnx.to_flat_state(shardings)}
    kernels = [spec for p, spec in specs.items() if p[-1] == "kernel"]
    assert len(kernels) == 3 and all(s == PartitionSpec(None, "fsdp") for s in kernels)  # param, mu, nu
    assert all(s == PartitionSpec() for p, s in specs.items() if p[-1] != "kernel")


def test_make_mesh_takes_the_rest_and_rejects_misfits():
    mesh = sharding.make_mesh()
    assert tuple(mesh.shape.values()) == (len(jax.devices()), 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        sharding.make_mesh(data=-1, fsdp=len(jax.devices()) + 1)


# ---- sharded runs (subprocess with 8 fake CPU devices) ----


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "tests.test_sharding", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out / "runs.npz")), json.loads((out / "meta.json").read_text())


@pytest.mark.parametrize("case", ["data8", "data8_padded", "fsdp4x2", "fsdp4x2_padded", "tensor2x2x2"])
def test_sharded_generate_equals_single_device(runs, case):
    arrays, meta = runs
    ref = meta[case]["reference"]
    # relative bound: on one device alone, changing only the batch size moves latents ~2e-6 relatively
    assert_close(arrays[f"{case}.latents"], arrays[f"{ref}.latents"], rel=1e-5)
    diff = np.abs(arrays[f"{case}.images"].astype(int) - arrays[f"{ref}.images"].astype(int))
    assert diff.max() <= 1


def test_rules_decide_which_params_are_split(runs):
    _, meta = runs
    assert meta["data8"]["sharded_params"] == 0
    assert meta["fsdp4x2"]["sharded_params"] > 0 and meta["tensor2x2x2"]["sharded_params"] > 0


@pytest.mark.parametrize("name", ["shard_batch", "global_batch"])
def test_batches_split_over_data_and_fsdp(runs, name):
    arrays, meta = runs
    assert meta[name] == [2] * 8  # 16 rows over a 4x2 mesh: 2 rows on each device
    np.testing.assert_array_equal(arrays[f"{name}.rows"], np.arange(16 * 3).reshape(16, 3))


def test_train_with_placed_model_and_sharded_batches_equals_single_device(runs):
    arrays, meta = runs
    assert meta["train"]["sharded_params"] > 0
    for i in range(meta["train"]["leaves"]):
        assert_close(arrays[f"train.sharded.{i}"], arrays[f"train.single.{i}"], rel=1e-5)


def _worker(out: Path) -> None:
    """Run every sharded case and its single-device reference; save arrays and facts for the tests."""
    from jax_erasepro.pipeline import generate
    from jax_erasepro.tiny import tiny_random_sd
    from recipes.shapes_sd.training import TrainConfig, train

    assert len(jax.devices()) == 8
    sd = tiny_random_sd(seed=3)
    prompts = [f"a photo of shape {i}" for i in range(8)]
    guided = dict(num_inference_steps=3, height=16, width=16, seed=2, return_latents=True)
    noisy = dict(guided, scheduler="ddpm", guidance_scale=1.0)  # DDPM draws noise each step: tests padding
    meshes = {
        "data8": sharding.make_mesh(8),
        "fsdp4x2": sharding.make_mesh(4, 2),
        "tensor": sharding.make_mesh(2, 2, 2),
    }
    cases = {  # name: (prompts, kwargs, mesh, rules, reference)
        "single8": (prompts, guided, None, sharding.DEFAULT_RULES, None),
        "single5": (prompts[:5], noisy, None, sharding.DEFAULT_RULES, None),
        "data8": (prompts, guided, meshes["data8"], sharding.DEFAULT_RULES, "single8"),
        "data8_padded": (prompts[:5], noisy, meshes["data8"], sharding.DEFAULT_RULES, "single5"),
        "fsdp4x2": (prompts, guided, meshes["fsdp4x2"], TINY_FSDP, "single8"),
        "fsdp4x2_padded": (prompts[:5], noisy, meshes["fsdp4x2"], TINY_FSDP, "single5"),
        "tensor2x2x2": (prompts, guided, meshes["tensor"], TENSOR_RULES, "single8"),
    }
    arrays, meta = {}, {}
    for name, (texts, kw, mesh, rules, ref) in cases.items():
        images, latents = generate(sd, texts, mesh=mesh, rules=rules, **kw)
        arrays[f"{name}.images"], arrays[f"{name}.latents"] = images, latents
        if mesh is not None:
            placed = sharding.param_shardings(nnx.state(sd.unet), mesh, rules)
            n = sum(not s.is_fully_replicated for s in jax.tree.leaves(placed))
            meta[name] = {"reference": ref, "sharded_params": n}
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    for name, split in (("shard_batch", sharding.shard_batch), ("global_batch", sharding.global_batch)):
        x = split({"rows": rows}, meshes["fsdp4x2"])["rows"]
        arrays[f"{name}.rows"] = np.asarray(x)
        meta[name] = sorted(s.data.shape[0] for s in x.addressable_shards)

    class Toy(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.layers = nnx.List([nnx.Linear(4, 64, rngs=rngs), nnx.Linear(64, 8, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jax.nn.tanh(self.layers[0](x)))

    def data(step: int) -> dict[str, np.ndarray]:
        x = np.random.default_rng(step).normal(size=(32, 4)).astype(np.float32)
        return {"x": x, "y": np.tile(np.sin(x), 2)}

    def loss_fn(model, batch, key):
        noise = 0.01 * jax.random.normal(key, batch["y"].shape)
        return jnp.mean((model(batch["x"]) - batch["y"] - noise) ** 2)

    cfg = TrainConfig(steps=5, lr=1e-2, log_every=5)
    mesh = meshes["fsdp4x2"]
    single = train(Toy(), loss_fn, data, cfg)
    model = sharding.place_module(Toy(), mesh, TINY_FSDP)
    sharded = train(model, loss_fn, lambda step: sharding.shard_batch(data(step), mesh, TINY_FSDP), cfg)
    for tag, m in (("single", single), ("sharded", sharded)):
        for i, leaf in enumerate(jax.tree.leaves(nnx.state(m, nnx.Param))):
            arrays[f"train.{tag}.{i}"] = np.asarray(leaf)
    placed = jax.tree.leaves(nnx.state(sharding.place_module(Toy(), mesh, TINY_FSDP)))
    meta["train"] = {
        "leaves": len(jax.tree.leaves(nnx.state(single, nnx.Param))),
        "sharded_params": sum(not leaf.sharding.is_fully_replicated for leaf in placed),
    }
    np.savez(out / "runs.npz", **arrays)
    (out / "meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
