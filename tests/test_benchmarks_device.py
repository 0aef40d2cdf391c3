"""benchmarks/device.py, the one-command GPU run: its JSON's structure (no timings are asserted).

The fast test drives the recorder with stand-in stages (a part that fails, a stage that raises, results
merged across calls as device.sh makes them); the slow one runs every real stage with ``--quick`` (tiny
configs, 2 steps, 1/2/3 concepts) on the CPU, a few minutes on 2 cores, mostly compiling.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device  # noqa: E402


def check_structure(data: dict, stages) -> None:
    assert isinstance(data["card"], str) and data["card"]
    assert set(data["imports"]) >= {"jax", "torch", "diffusers"}
    assert set(data["stages"]) == set(stages)
    for name, stage in data["stages"].items():
        assert stage["seconds"] > 0, name
        if "error" in stage:
            assert isinstance(stage["error"], str) and stage["error"], name
            continue
        assert stage["parts"], name
        for part_name, part in stage["parts"].items():
            where = f"{name}/{part_name}"
            assert part["seconds"] > 0, where
            if "error" in part:
                assert isinstance(part["error"], str) and part["error"], where
                continue
            timed = [k for k in part if k.endswith("_s") or k == "seconds"]
            numbers = [part[k] for k in timed if isinstance(part[k], int | float)]
            assert numbers or "rows" in part, where
            assert all(math.isfinite(v) and v >= 0 for v in numbers), where


def test_recorder_keeps_errors_and_merges(tmp_path, monkeypatch):
    def fine(rec, cfg):
        rec.part("pipeline", "jax", lambda: {"generate_s": 0.5})
        rec.part("pipeline", "torch", lambda: 1 / 0)

    def broken(rec, cfg):
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(device, "RUNNERS", {**device.RUNNERS, "pipeline": fine, "erase": broken})
    out = tmp_path / "card.json"
    device.main(["--quick", "--out", str(out), "--stages", "pipeline"])
    device.main(["--quick", "--out", str(out), "--stages", "erase"])  # a second process, as device.sh runs
    data = json.loads(out.read_text())
    check_structure(data, ["pipeline", "erase"])
    assert data["stages"]["pipeline"]["parts"]["torch"]["error"].startswith("ZeroDivisionError")
    assert data["stages"]["pipeline"]["failed_parts"] == ["torch"]
    assert data["stages"]["erase"]["error"] == "RuntimeError: no GPU here"


def test_config_folder_and_card_name(tmp_path):
    assert device.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    source = device.materialize_configs(None, False, tmp_path)
    for rel in (*device.CONFIG_FILES, "tokenizer/vocab.json"):
        assert (tmp_path / rel).is_file(), rel
    assert Path(source).is_dir()


@pytest.mark.slow
def test_quick_run_of_the_real_stages(tmp_path):
    out = tmp_path / "cpu.json"
    # the erase stage for real (the other stages call benchmarks/pipeline.py, erase() of each fine-tuning
    # method and evaluate(), each tested elsewhere; the fast test drives every stage's recording): this
    # checks a real stage end to end and its JSON within the suite's time
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "device.py"),
        "--quick",
        "--out",
        str(out),
        "--methods",
        "esd-x",
        "--stages",
        "erase",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    check_structure(data, ["erase"])
    assert data["quick"] is True
    assert set(data["stages"]["erase"]["parts"]) == {"concepts_1", "concepts_2", "concepts_3"}
