"""xla_flags: the training flags reach XLA_FLAGS only before JAX's backend starts, and never twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recipes.shapes_sd.xla_flags import TRAINING_FLAGS, use_training_flags

ROOT = Path(__file__).parents[3]  # where ``recipes`` imports from
PROBE = """
import json, os
from recipes.shapes_sd.xla_flags import use_training_flags
first = use_training_flags()
again = use_training_flags()
import jax.numpy as jnp
jnp.ones(1)  # the backend starts with the flags: an unknown or malformed flag would abort here
print(json.dumps({"first": first, "again": again, "flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _probe(xla_flags: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_added_before_the_backend_starts_and_accepted_by_xla():
    got = _probe(None)
    assert got["first"] and not got["again"]
    assert got["flags"].split() == list(TRAINING_FLAGS)


def test_kept_beside_other_flags_and_not_overridden():
    got = _probe("--xla_force_host_platform_device_count=2")
    assert got["flags"].split() == ["--xla_force_host_platform_device_count=2", *TRAINING_FLAGS]
    mine = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    got = _probe(mine)
    assert not got["first"] and got["flags"] == mine


def test_not_added_once_the_backend_runs(monkeypatch):
    import jax.numpy as jnp

    jnp.ones(1)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not use_training_flags()
    assert "XLA_FLAGS" not in os.environ


def test_not_added_on_another_jaxlib(monkeypatch):
    import jaxlib.version

    from recipes.shapes_sd import xla_flags

    monkeypatch.setattr(jaxlib.version, "__version__", "9.9.0")
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not use_training_flags()
    assert "XLA_FLAGS" not in os.environ
