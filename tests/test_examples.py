"""The scripts in examples/ run as documented, in their quick mode (plumbing, not image quality)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples.{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_erase_shapes_sd(tmp_path):
    summary = example("erase_shapes_sd").main(["--quick", "--out", str(tmp_path)])
    assert {"target_rate", "anchor_rate", "others_accuracy"} <= set(summary)
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert (tmp_path / "evaluation" / "evaluation.json").is_file()


def test_erase_your_model_with_a_clip_of_yours(tmp_path):
    """A diffusers folder of the user's and any CLIP folder as judge; the LoRA then runs in diffusers."""
    pytest.importorskip("diffusers")
    import jax_erasepro as jep
    from jax_erasepro.shapes.judge import judge_path
    from jax_erasepro.tiny import tiny_random_sd

    jep.save_pretrained(tiny_random_sd(), tmp_path / "model")
    args = [
        "--model",
        str(tmp_path / "model"),
        "--judge",
        str(judge_path()),
        "--target",
        "cat",
        "--anchor",
        "dog",
        "--out",
        str(tmp_path / "out"),
        "--quick",
        "--diffusers",
    ]
    summary = example("erase_your_model").main(args)
    assert summary["target_rate"] is None  # no ground truth with a CLIP of the user's
    assert 0 <= summary["clip_score"]["O"]["value"] <= 1
    assert (tmp_path / "out" / "lora").is_dir() and (tmp_path / "out" / "diffusers.png").is_file()


def test_closed_form_in_jax():
    """vmap over concepts and grad through the closed form: ErasePro exact, preserved columns held."""
    out = example("closed_form_in_jax").main(["--concepts", "zorbly", "heart"])
    assert max(out["erasepro_target_residual"]) < 1e-4
    assert max(out["erasepro_preserve_drift"]) < 1e-4
    assert all(0 < r < 1 for r in out["uce_target_residual"])  # UCE is a ridge solve: near, not exact
    for g, fd in zip(out["d_drift_d_lam"], out["central_difference"], strict=True):
        assert g == pytest.approx(fd, rel=0.05, abs=1e-4)  # jax.grad through the SVD-based solve


def test_mesh_example_on_this_host():
    out = example("mesh_pod_slice").main(["--quick"])
    assert out["pixel_gap"] <= 2  # the mesh draws what one device draws
