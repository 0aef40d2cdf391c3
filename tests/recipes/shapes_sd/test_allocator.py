"""allocator: the re-exec environment is right, and a re-executed process really runs on jemalloc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.shapes_sd.allocator import CHOICE, MALLOC_CONF, find_jemalloc, jemalloc_env

LIB = "/opt/lib/libjemalloc.so.2"
ROOT = Path(__file__).parents[3]  # where ``recipes`` imports from


def test_env_preloads_jemalloc_and_keeps_the_rest():
    env = jemalloc_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so"}, LIB)
    assert env == {"PATH": "/bin", "LD_PRELOAD": f"{LIB}:/opt/libfoo.so", "MALLOC_CONF": MALLOC_CONF,
                   CHOICE: "jemalloc"}
    assert jemalloc_env({}, LIB)["LD_PRELOAD"] == LIB


def test_users_malloc_conf_wins():
    assert jemalloc_env({"MALLOC_CONF": "narenas:1"}, LIB)["MALLOC_CONF"] == "narenas:1"


@pytest.mark.parametrize(
    ("environ", "library"),
    [({CHOICE: "system"}, LIB), ({}, None), ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIB)],
    ids=["opted-out", "not-installed", "already-preloaded"],
)
def test_no_reexec(environ, library):
    assert jemalloc_env(environ, library) is None


def test_find_jemalloc_takes_the_first_that_exists(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    assert find_jemalloc((str(tmp_path / "missing.so"),)) is None
    lib.write_bytes(b"")
    assert find_jemalloc((str(tmp_path / "missing.so"), str(lib))) == str(lib)


PROBE = """
import sys
from recipes.shapes_sd.allocator import use_jemalloc
print("started", flush=True)
use_jemalloc()
maps = open("/proc/self/maps").read()
print("jemalloc" if "libjemalloc" in maps else "glibc", sys.argv[1:])
"""


@pytest.mark.skipif(find_jemalloc() is None, reason="jemalloc is not installed (apt install libjemalloc2)")
def test_reexec_runs_the_same_command_on_jemalloc():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", CHOICE)}
    out = subprocess.run([sys.executable, "-c", PROBE, "a", "b c"], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.splitlines()
    assert out == ["started", "started", "jemalloc ['a', 'b c']"]  # ran twice: once per process image
    env[CHOICE] = "system"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.splitlines()
    assert out == ["started", "glibc []"]
