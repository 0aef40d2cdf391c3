"""Shared test fixtures: paths to SD v1.4's real configs and tokenizer (copied into tests/data), and one
compilation cache for the run."""

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
SD14 = DATA / "sd-v1-4"


def pytest_configure(config) -> None:
    """One persistent XLA compilation cache for the whole run, in a new temporary folder, shared with the
    test workers and the processes tests start (through JAX's environment variables), so a program that one
    process compiled (a tiny model's forward, an erasure sweep) loads in the others. The controlling
    process makes and deletes it, so each run still compiles everything once."""
    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") if hasattr(config, "workerinput") else None
    if folder is None:
        folder = tempfile.mkdtemp(prefix="jax-erasepro-tests-xla-")
        config._jep_xla_cache = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "_jep_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


GB_PER_WORKER = 11  # the suite's peak resident memory in one process is about 10 GB (real SD v1.4 configs)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most one per GB_PER_WORKER of memory, and at most 2 (more
    workers compile the same programs again, and each holds its own models)."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = GB_PER_WORKER
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores, int(memory_gb // GB_PER_WORKER)))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(config, items) -> None:
    """For ``--dist loadgroup``: a file's tests run on one worker (its module fixtures are built once), and
    every real-config test on the same worker, so two SD v1.4 models never sit in memory side by side."""
    for item in items:
        group = "sd14" if item.get_closest_marker("slow") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def assert_close(actual, reference, rel: float = 1e-4) -> None:
    """The issue's parity bound: max abs error <= rel * max(1, max |reference|)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    bound = rel * max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(actual - reference).max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def assert_same_params(a, b) -> None:
    """Two StableDiffusion models hold bit-identical params under the same keys."""
    from jax_erasepro.weights import to_state_dict

    for name in ("text_encoder", "unet", "vae"):
        sa, sb = to_state_dict(getattr(a, name)), to_state_dict(getattr(b, name))
        assert sa.keys() == sb.keys()
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.fixture(scope="session")
def sd14_dir() -> Path:
    return SD14


RELEASE_ABOVE_GB = 3.0  # resident memory past which a finished module's compiled programs are dropped


def _resident_gb() -> float:
    """This process's resident memory now (not its peak), from /proc; 0 where there is none."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc only): XLA's compiler leaves the heap
    fragmented, and two test workers each growing past 12 GB exhausted a 24 GB machine."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module: free the heap's unused pages and, when the process still holds more than
    RELEASE_ABOVE_GB, drop every compiled program (and the models their closures hold). Not unconditionally:
    a cold start reloads each program (from the run's compilation cache, seconds per model)."""
    yield
    import gc

    gc.collect()
    _trim_heap()
    if _resident_gb() > RELEASE_ABOVE_GB:
        import jax

        jax.clear_caches()
        gc.collect()
        _trim_heap()


def assert_unet_grads_match(sd, grads, torch_params, names) -> None:
    """JAX gradients of U-Net params (an nnx.State) equal the torch ``.grad`` of the same diffusers keys
    (``names``: ``unet.<key>``), each tensor to 1e-4 of its largest entry (gradients are far below 1)."""
    from flax import nnx

    from jax_erasepro import surgery
    from jax_erasepro.weights import to_hf_layout

    by_path = {e.path: (k, e.leaf) for k, e in surgery.entries(sd, ["unet"]).items()}
    flat = dict(nnx.to_flat_state(grads))
    assert {by_path[p][0] for p in flat} == names
    for path, g in flat.items():
        key, leaf = by_path[path]
        want = torch_params[key.split(".", 1)[1]].grad.numpy()
        got = to_hf_layout(leaf, np.asarray(g[...]))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-9, key
