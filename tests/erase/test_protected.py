"""Protected ErasePro: hard columns held exactly, the edit weighted away from the retain set's features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_erasepro.erase import erase
from jax_erasepro.erase.erasepro import (
    PROTECTED_RCOND,
    PROTECTED_START,
    _edit_operator,
    _second_moment,
    _whitener,
)
from jax_erasepro.erase.retain import GENERIC_CAPTIONS, default_retain
from jax_erasepro.tiny import tiny_random_sd


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(0)


def test_whitened_edit_is_the_retain_weighted_minimum():
    """Among all dW with dW X = T, the whitened solve minimises ||dW R||^2 / n + lam ||dW||^2 (checked
    against the closed form dW = T (X^T M^-1 X)^-1 X^T M^-1 in float64) and so beats the plain minimum-norm
    edit on the retain set."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        d, k, n = 12, 3, 40
        r = rng.normal(size=(n, d)) @ np.diag(np.r_[np.ones(8) * 3, np.full(4, 0.05)])  # 4 quiet directions
        x, y = rng.normal(size=(d, k)), rng.normal(size=(d, k))
        ridge = 1e-2
        s = _whitener(_second_moment(jnp.asarray(r)), ridge)
        op, hard, _ = _edit_operator(jnp.asarray(x), jnp.asarray(y), jnp.ones(k, bool), 1e-10, whiten=s)
        w_o = rng.normal(size=(5, d))
        dw = -(w_o @ (x - y)) @ np.asarray(op)  # _apply's factored form: W = W_o - W_o (X - Y) P
        assert np.allclose((w_o + dw) @ x, w_o @ y, atol=1e-9)
        m = r.T @ r / n
        m += ridge * np.trace(m) / d * np.eye(d)
        mi = np.linalg.inv(m)
        closed = (w_o @ (y - x)) @ np.linalg.inv(x.T @ mi @ x) @ x.T @ mi
        assert np.allclose(dw, closed, atol=1e-8)
        plain = (w_o @ (y - x)) @ np.linalg.pinv(x)
        assert np.linalg.norm(dw @ r.T) < 0.5 * np.linalg.norm(plain @ r.T)


def test_protected_defaults_hold_the_target_and_report_the_retain_change(sd):
    erased, report = erase(sd, ["van gogh"], "artist", preserve=["monet"], prompts=["a painting by {}", "{}"])
    assert report.options["form"] == "protected" and report.options["pad_tokens"] == 0
    assert report.options["start_layer"] == min(PROTECTED_START, sd.config.text_encoder.num_hidden_layers)
    assert report.columns["padding"] == 0 and report.options["retain"][0] == ""
    assert report.options["rcond"] == PROTECTED_RCOND
    for e in report.layers:  # cond <= 1 / rcond: a nearly collinear column may be soft, the concept's are not
        assert e["residual_hard"] <= 1e-4, e
        assert report.columns["concept"] <= e["n_hard"] <= report.columns["total"], e
        assert 0 <= e["retain_change"] < e["relative_change"] * 10
    held = erase(
        sd, ["van gogh"], "artist", preserve=["monet"], prompts=["a painting by {}", "{}"], rcond=1e-4
    )[1]
    assert all(e["n_hard"] == held.columns["total"] for e in held.layers)
    paper = erase(
        sd, ["van gogh"], "artist", preserve=["monet"], prompts=["a painting by {}", "{}"], form="paper"
    )[1]
    unet = [e["retain_change"] for e in report.layers if e["stage"] == "unet"]
    assert max(unet) < max(e["retain_change"] for e in paper.layers if e["stage"] == "unet")


def test_default_retain_leaves_out_captions_naming_a_target(sd):
    kept = default_retain(sd, ["star"], ["monet"], ["a photo of {}"])
    assert "a yellow star" in GENERIC_CAPTIONS and "a yellow star" not in kept
    assert "" in kept and "a photo of monet" in kept and "a red circle" in kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"form": "plain"}, "unknown form"),
        ({"ridge": 0}, "ridge"),
        ({"retain": "a cat"}, "retain: expected list"),
    ],
)
def test_bad_options(sd, kwargs, message):
    from jax_erasepro.erase import EraseError

    with pytest.raises(EraseError, match=message):
        erase(sd, ["cat"], "dog", **kwargs)


def test_preserving_a_target_spelled_otherwise_is_refused(sd):
    """CLIP lowercases: preserving "CAT" would hold "cat" in place and silently cancel its erasure."""
    from jax_erasepro.erase import EraseError

    with pytest.raises(
        EraseError, match="'CAT' is both a target and preserved .it tokenizes as the target 'cat'"
    ):
        erase(sd, ["cat"], "dog", preserve=["CAT"])
