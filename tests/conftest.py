"""Shared test fixtures: paths to SD v1.4's real configs and tokenizer (copied into tests/data)."""

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
SD14 = DATA / "sd-v1-4"


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module's compiled programs (and the models their closures hold) are dropped after it: the
    whole suite in one process otherwise grows past 11 GB of the machine's 24 and XLA's compiler can fail."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
