"""The ``jax-erasepro`` command line on the embedded shapes-sd (few sampling steps)."""

import json

import pytest

from jax_erasepro import cli


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "erase"
    argv = ["erase", "--target", "zorbly", "--anchor", "star", "--preserve", "quibbet", "--steps", "2"]
    assert cli.main([*argv, "--scale", "1", "--out", str(out)]) == 0
    return out


def test_erase_writes_model_report_grid_and_quick_evaluation(erased):
    names = {"model", "report.json", "report.png", "before_after.png", "evaluation"}
    assert {p.name for p in erased.iterdir()} == names
    evaluation = json.loads((erased / "evaluation" / "evaluation.json").read_text())
    for key in ("target_rate", "others_accuracy"):
        assert 0 <= evaluation[key]["before"] <= 1 and 0 <= evaluation[key]["after"] <= 1
    assert (erased / "evaluation" / "grid_others.png").read_bytes()[:4] == b"\x89PNG"
    assert (erased / "model" / "model_index.json").is_file()
    report = json.loads((erased / "report.json").read_text())
    assert report["targets"] == ["zorbly"] and report["preserve"] == ["quibbet"]
    assert max(layer["residual_hard"] for layer in report["layers"]) <= 1e-5
    assert not list(erased.parent.glob(".*partial"))


def test_evaluate_reads_the_erase_folder(erased, tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--erased", str(erased), "--quick", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target rate" in printed and "CLIP score A" in printed and f"wrote {out}" in printed
    assert json.loads((out / "evaluation.json").read_text())["targets"] == ["zorbly"]


def test_evaluate_without_a_report_is_one_line(tmp_path, capsys):
    assert cli.main(["evaluate", "--erased", str(tmp_path)]) == 2
    assert "no --target given and no erase report" in capsys.readouterr().err


def test_report_prints_every_edited_weight(erased, capsys):
    assert cli.main(["report", str(erased)]) == 0
    out = capsys.readouterr().out
    layers = json.loads((erased / "report.json").read_text())["layers"]
    assert "zorbly" in out and all(layer["key"] in out for layer in layers)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "star", "--anchor", "star"], "'star' equals its anchor"),
        (["--target", "star", "--anchor", "dot", "--method", "esd"], "unknown method 'esd'"),
        (["--anchor", "star"], "no target concept"),
        (["--target", "a", "--target", "b", "--anchor", "x", "--anchor", "y", "--anchor", "z"], "2 targets"),
    ],
)
def test_erase_errors_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["erase", *argv, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_erase_refuses_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["erase", "--target", "zorbly", "--anchor", "star", "--out", str(tmp_path)]) == 2
    assert "output folder exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a red star", "--prompt", "a blue heart", "--steps", "2", "--scale", "1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert out.is_file() and "2 images" in capsys.readouterr().out


def test_report_of_a_missing_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no report at" in capsys.readouterr().err


def test_console_script_turns_the_compilation_cache_on(monkeypatch):
    calls = []
    monkeypatch.setattr("jax_erasepro.compile_cache.use_compilation_cache", lambda: calls.append("cache"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    assert cli.run() == 0
    assert calls == ["cache", "main"]


def _config(tmp_path, text: str | bytes) -> list[str]:
    path = tmp_path / "erase.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["erase", "--config", str(path), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize(
    "text, preserve",
    [
        ("pairs: [{target: zorbly, anchor: star}]\npreserve: dog\n", ["dog"]),
        ("pairs: [{target: zorbly, anchor: star}]\npreserve: [dog, quibbet]\n", ["dog", "quibbet"]),
        ("pairs: [{target: zorbly, anchor: star}]\n", []),
    ],
)
def test_yaml_preserve_may_be_one_string(tmp_path, text, preserve):
    args = cli.build_parser().parse_args(_config(tmp_path, text))
    assert cli._read_pairs(args) == (["zorbly"], ["star"], preserve, {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("pairs: zorbly\n", "pairs must be a list"),
        ("pairs:\n  - zorbly\n", "pairs[0] must be"),
        ("pairs:\n  - {anchor: star}\n", "pairs[0] must be"),
        ("pairs:\n  - {target: [a, b], anchor: star}\n", "pairs[0] must be"),
        ("pairs:\n  - {target: a, anchor: b, weight: 2}\n", "pairs[0] must be"),
        ("pairs: [{target: a, anchor: b}]\npreserve: {dog: 1}\n", "preserve must be a string or a list"),
        ("pairs: [{target: a, anchor: b}]\npreserve: [dog, 3]\n", "preserve must be a string or a list"),
        ("- a\n- b\n", "expected a mapping"),
        ("1: x\npairs: [{target: a, anchor: b}]\n", "expected a mapping"),
        ("pairs: [unclosed\n", "not valid YAML"),
        ("pairs:\n\t- {target: a}\n", "not valid YAML"),
        ("pairs: &x [*x]\n", "pairs[0] must be"),  # a list holding itself
        (b"pairs: [{target: \xff}]\n", "cannot read the config"),
    ],
)
def test_bad_yaml_configs_are_one_line_errors(tmp_path, capsys, text, message):
    assert cli.main(_config(tmp_path, text)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'erase.yaml'}: ") and message in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erase.yaml"]


def test_a_config_that_is_a_folder(tmp_path, capsys):
    assert cli.main(["erase", "--config", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read the config" in capsys.readouterr().err
