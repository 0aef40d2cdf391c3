"""The persistent compilation cache the command line turns on, run in fresh processes (it is global state)."""

import json
import os
import subprocess
import sys

import pytest

from jax_erasepro import compile_cache

PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from jax_erasepro.compile_cache import use_compilation_cache
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
folder = use_compilation_cache(*sys.argv[1:])
y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
print(json.dumps({"folder": str(folder) if folder else None, "y": y.tolist(), "hits": len(hits)}))
"""


def _probe(env: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_the_programs_back(tmp_path):
    env = {compile_cache.CHOICE: str(tmp_path / "xla")}
    first, second = _probe(env), _probe(env)
    assert first["folder"] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())
    assert first["hits"] == 0 and second["hits"] >= 1
    assert second["y"] == first["y"]


def test_default_folder_follows_xdg(tmp_path):
    got = _probe({"XDG_CACHE_HOME": str(tmp_path)})
    assert got["folder"] == str(tmp_path / "jax-erasepro" / "xla")


@pytest.mark.parametrize(
    "env", [{compile_cache.CHOICE: "off"}, {"JAX_COMPILATION_CACHE_DIR": "USER"}], ids=["off", "jax-own"]
)
def test_off_or_already_configured_changes_nothing(env, tmp_path):
    env = {k: str(tmp_path / "user") if v == "USER" else v for k, v in env.items()}
    got = _probe({"XDG_CACHE_HOME": str(tmp_path / "xdg"), **env})
    assert got["folder"] is None and not (tmp_path / "xdg").exists()
