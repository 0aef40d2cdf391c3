"""The method contract: options dataclasses, conversion of text values, the registry."""

import dataclasses

import pytest

from jax_erasepro.erase import METHODS, EraseError, EraseProOptions, ImplicitOptions, UCEOptions, get_method
from jax_erasepro.erase.methods import convert, parse_assignment


def test_every_method_describes_every_option():
    for method in METHODS.values():
        rows = method.describe()
        assert [r["name"] for r in rows] == [f.name for f in dataclasses.fields(method.options)]
        for row in rows:
            assert row["help"], (method.name, row["name"])
            if row["choices"] is not None:
                assert row["default"] in row["choices"]
        method.options()  # the defaults validate


def test_docs_list_every_option_with_its_default():
    """docs/methods.md has a table row for every option of every registered method (implicit's inherited
    options are ErasePro's rows)."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    for method in METHODS.values():
        assert f"## `{method.name}`" in text, method.name
        for row in method.describe():
            assert f"| `{row['name']}` |" in text, (method.name, row["name"])


def test_text_values_take_the_declared_type():
    uce = get_method("uce")
    opts = uce.make_options({"lam": "1e-2", "preserve_scale": "none", "precision": "float64"})
    assert opts == UCEOptions(lam=0.01, preserve_scale=None, precision="float64")
    ep = get_method("erasepro").make_options(
        {"start_layer": "3", "last_token_only": "false", "retain": '["", "a cat"]', "ridge": 1}
    )
    assert ep == EraseProOptions(start_layer=3, last_token_only=False, retain=("", "a cat"), ridge=1.0)
    assert isinstance(ep.ridge, float)
    assert get_method("uce").make_options({"variant": 2025}).variant == "2025"  # YAML reads 2025 as an int
    assert get_method("erasepro-implicit").make_options({"strength": "strong"}) == ImplicitOptions(
        "protected", strength="strong"
    )


@pytest.mark.parametrize(
    "method, values, message",
    [
        ("uce", {"lam": "x"}, "option lam: expected float, got 'x'"),
        ("uce", {"lam": "nan"}, "option lam: expected float"),
        ("uce", {"lam": True}, "option lam: expected float"),
        ("uce", {"lam": 0}, "lam must be > 0"),
        ("uce", {"variant": "2024"}, "unknown variant '2024' \\(choose from 2023, 2025\\)"),
        ("erasepro", {"start_layer": "1.5"}, "option start_layer: expected int \\| none, got '1.5'"),
        ("erasepro", {"start_layer": 0}, "start_layer must be >= 1"),
        ("erasepro", {"unroll": "maybe"}, "option unroll: expected bool"),
        ("erasepro", {"rcond": "1e-4x"}, "option rcond"),
        (
            "erasepro",
            {"layer": "unet"},
            "unknown option\\(s\\) for method 'erasepro': layer \\(options: form",
        ),
        ("erasepro-implicit", {"strength": "medium"}, "unknown strength 'medium'"),
    ],
)
def test_bad_values_are_one_line_naming_the_option(method, values, message):
    with pytest.raises(EraseError, match=message) as info:
        get_method(method).make_options(values)
    assert "\n" not in str(info.value)


def test_assignments_and_unknown_methods():
    assert parse_assignment(" lam = 0.5 ") == ("lam", "0.5")
    assert parse_assignment("retain=a=b") == ("retain", "a=b")
    for bad in ("lam", "=1"):
        with pytest.raises(EraseError, match="expected key=value"):
            parse_assignment(bad)
    with pytest.raises(
        EraseError, match="unknown method 'esd' \\(choose from erasepro, erasepro-implicit, uce"
    ):
        get_method("esd")
    assert convert(None, int | None, "k") is None and convert("null", float | None, "k") is None


def test_the_compile_cache_is_bounded(monkeypatch):
    """Erasures of many shapes keep at most COMPILED_MAX programs, dropping the least recently used."""
    import jax
    import jax.numpy as jnp

    from jax_erasepro.erase import erasepro

    monkeypatch.setattr(erasepro, "_COMPILED", type(erasepro._COMPILED)())
    monkeypatch.setattr(erasepro, "COMPILED_MAX", 2)
    double = jax.jit(lambda x: 2 * x)
    first = erasepro._compiled(double, jnp.zeros(1))
    erasepro._compiled(double, jnp.zeros(2))
    assert erasepro._compiled(double, jnp.zeros(1)) is first  # a hit refreshes it
    erasepro._compiled(double, jnp.zeros(3))
    assert len(erasepro._COMPILED) == 2
    assert erasepro._compiled(double, jnp.zeros(1)) is first  # kept: used more recently than shape (2,)
