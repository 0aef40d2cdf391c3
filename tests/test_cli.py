"""The ``jax-erasepro`` command line on the embedded shapes-sd (few sampling steps), and its argument checks:
every bad argument is one ``error:`` line and exit code 2 before any model is loaded."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_erasepro import cli
from jax_erasepro.erase import REGISTRY

EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "erase_config.yaml"
FAST = ["--steps", "2", "--scale", "1"]


class Loaded(Exception):
    """Raised by the stand-in for ``cli.load_model``: the command got past its argument checks."""


@pytest.fixture
def no_load(monkeypatch):
    """``cli.load_model`` raises Loaded, so a test proves a bad argument was refused before any load."""

    def load_model(path):
        raise Loaded(path)

    monkeypatch.setattr(cli, "load_model", load_model)


def _one_error_line(capsys, message: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    return err[-1]


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "erase"
    argv = ["erase", "--target", "zorbly", "--anchor", "star", "--preserve", "quibbet", *FAST]
    assert cli.main([*argv, "--out", str(out)]) == 0
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
    assert not list(erased.parent.glob(".*tmp*"))


@pytest.mark.parametrize("fmt", ["single_file", "orbax", "delta", "lora"])  # diffusers: the fixture's
def test_erase_writes_each_format_with_typed_options(fmt, erased, tmp_path, capsys):
    import jax_erasepro as jep

    out = tmp_path / "out"
    argv = ["erase", "--target", "zorbly", "--anchor", "star", "--preserve", "quibbet", *FAST, "--no-eval"]
    options = ["--option", "ridge=1e-2", "--option", "last_token_only=yes"]  # the defaults, given as text
    assert cli.main([*argv, *options, "--format", fmt, "--out", str(out)]) == 0
    assert f"wrote {out.resolve()}/: model" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["ridge"] == 0.01 and report["options"]["last_token_only"] is True
    if fmt == "single_file":
        assert {p.name for p in out.iterdir()} == {"model.safetensors", "report.json", "report.png",
                                                  "before_after.png"}
        assert cli._erased_model(out) == (str(out / "model.safetensors"), False)  # what evaluate loads
        jep.load_pretrained(out / "model.safetensors")
    elif fmt == "delta":
        assert cli._erased_model(out) == (str(out / "model"), True)
        jep.apply_delta(jep.load_pretrained(), out / "model")
    elif fmt == "lora":
        assert (out / "model" / "lora.json").is_file()
        with pytest.raises(cli.UsageError, match="holds a LoRA export"):
            cli._erased_model(out)
    else:
        assert cli._erased_model(out) == (str(out / "model"), False)
        jep.load_pretrained(out / "model")


def test_evaluate_reads_the_erase_folder(erased, tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--erased", str(erased), "--quick", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target rate" in printed and "CLIP score A" in printed and f"wrote {out.resolve()}" in printed
    assert json.loads((out / "evaluation.json").read_text())["targets"] == ["zorbly"]


def test_report_prints_every_edited_weight(erased, capsys):
    assert cli.main(["report", str(erased)]) == 0
    out = capsys.readouterr().out
    layers = json.loads((erased / "report.json").read_text())["layers"]
    assert "zorbly" in out and all(layer["key"] in out for layer in layers)


def test_pngs_are_readable_by_others(erased):
    mask = 0o666 & ~_umask()
    assert stat.S_IMODE((erased / "before_after.png").stat().st_mode) == mask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- arguments refused before the model loads -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "a", "--anchor", "b", "--method", "esd"], "argument --method: invalid choice: 'esd'"),
        (["--target", "a", "--anchor", "b", "--option", "colour=red"],
         "unknown option(s) for method 'erasepro': colour"),
        (["--target", "a", "--anchor", "b", "--option", "ridge=abc"], "option ridge: expected float"),
        (["--target", "a", "--anchor", "b", "--option", "ridge=nan"], "option ridge: expected float"),
        (["--target", "a", "--anchor", "b", "--option", "form=best"], "unknown form 'best'"),
        (["--target", "a", "--anchor", "b", "--option", "ridge"], "--option 'ridge': expected key=value"),
        (["--target", "a", "--anchor", "b", "--method", "uce", "--option", "form=paper"],
         "unknown option(s) for method 'uce': form"),
        (["--target", "a", "--anchor", "b", "--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["--target", "a", "--anchor", "b", "--steps", "x"], "argument --steps: expected an integer >= 1"),
        (["--target", "a", "--anchor", "b", "--guidance", "-1"], "argument --guidance: expected a finite"),
        (["--target", "a", "--anchor", "b", "--guidance", "nan"], "argument --guidance: expected a finite"),
        (["--target", "a", "--anchor", "b", "--scale", "0"], "argument --scale: expected an integer >= 1"),
        (["--target", "a", "--anchor", "b", "--format", "ckpt"], "argument --format: invalid choice: 'ckpt'"),
        (["--anchor", "star"], "no target concept"),
        (["--target", "a", "--target", "b", "--anchor", "x", "--anchor", "y", "--anchor", "z"],
         "2 targets but 3 anchors: give one --anchor for all, one per target, or --anchor '' to erase"),
        (["--target", "stripes"], "1 target but 0 anchors: give one --anchor for all"),
        (["--target", "Cat", "--anchor", "cat"], "target 'Cat' equals its anchor 'cat': nothing to erase"),
        (["--target", " ", "--anchor", "cat"], "an empty target concept"),
        (["--target", "a", "--anchor", "b", "--model", "{tmp}/nothing"], "--model {tmp}/nothing: no such"),
        (["--target", "a", "--anchor", "b", "--model", "{tmp}/notes.txt"], "expected a model folder or a"),
        (["--target", "a", "--anchor", "b", "--judge", "{tmp}/missing"], "--judge {tmp}/missing: no such"),
    ],
)
def test_bad_erase_arguments_are_one_line_before_loading(argv, message, tmp_path, capsys, no_load):
    (tmp_path / "notes.txt").write_text("not a model")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["erase", *argv, "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, message.replace("{tmp}", str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bad_erase_outputs_are_one_line_before_loading(tmp_path, capsys, no_load):
    from jax_erasepro.default_model import default_model_path

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model_index.json").write_text("{}")
    cases = [
        ([], "used", "the folder exists and is not empty"),
        ([], "file", "is a file (give a new or empty folder)"),
        ([], "file/out", "file is a file, not a folder"),
        (["--model", str(tmp_path / "src")], "src/erased", "lies inside the source model"),
        ([], str(default_model_path() / "erased"), "lies inside the source model"),
    ]
    if Path("/proc").is_dir():
        cases.append(([], "/proc/jax-erasepro-test/out", "cannot write in /proc"))
    for extra, out, message in cases:
        argv = ["erase", "--target", "a", "--anchor", "b", *extra, "--out", str(tmp_path / out)]
        assert cli.main(argv) == 2, out
        assert f"--out {tmp_path / out}" in _one_error_line(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "src", "used"]
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]
    assert not (default_model_path() / "erased").exists()


def test_good_arguments_reach_the_model(tmp_path, no_load):
    with pytest.raises(Loaded):
        cli.main(["erase", "--target", "a", "--anchor", "b", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_implicit_erasure_without_anchor_erases_towards_nothing(tmp_path, capsys, no_load):
    argv = ["erase", "--target", "stripes", "--method", "erasepro-implicit", "--out", str(tmp_path / "o")]
    assert cli.erase_request(cli.build_parser().parse_args(argv))["anchors"] == [""]
    assert 'erasepro-implicit erases towards nothing (anchor "")' in capsys.readouterr().err


def test_many_targets_print_what_to_expect_before_loading(tmp_path, capsys, no_load):
    pairs = "".join(f"  - {{target: concept{i}, anchor: thing}}\n" for i in range(150))
    with pytest.raises(Loaded):
        cli.main(_config(tmp_path, f"pairs:\n{pairs}"))
    assert "note: erasing 150 concepts: expect about 21 s and 0.6 GB" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, no_load):
    argv = ["erase", "--out", str(tmp_path / "out")]
    with pytest.raises(cli.UsageError, match="no target concept"):
        cli.main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


# --- methods and help -------------------------------------------------------------------------------------


def test_methods_lists_every_method_with_its_paper(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for method in REGISTRY.values():
        assert f"{method.name}\n  {method.summary}\n  paper: {method.paper}" in out


def test_methods_name_lists_its_options(capsys):
    assert cli.main(["methods", "uce"]) == 0
    out = capsys.readouterr().out
    for row in REGISTRY["uce"].describe():
        assert f"  {row['name']} ({row['type']}, default {row['default']!r}" in out and row["help"] in out
    assert "variant (str, default '2023'; one of 2023, 2025)" in out
    assert cli.main(["methods", "esd"]) == 2
    _one_error_line(capsys, "invalid choice: 'esd'")


def test_help_shows_method_choices_defaults_and_the_config_layout(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["erase", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    from jax_erasepro.erase import REGISTRY

    assert "--method {" + ",".join(REGISTRY) + "}" in " ".join(out.split())
    for default in ("(default: diffusers)", "(default: 50)", "(default: 7.5)", "(default: 4)"):
        assert default in out
    assert "options: {form: protected, ridge: 1e-2}" in out and "examples/erase_config.yaml" in out


# --- YAML configs -----------------------------------------------------------------------------------------


def _config(tmp_path, text: str | bytes) -> list[str]:
    path = tmp_path / "erase.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["erase", "--config", str(path), "--out", str(tmp_path / "out")]


def _request(argv: list[str]) -> dict:
    return cli.erase_request(cli.build_parser().parse_args(argv))


def test_example_config_parses_and_validates(tmp_path, no_load):
    argv = ["erase", "--config", str(EXAMPLE_CONFIG), "--out", str(tmp_path / "out")]
    request = _request(argv)
    assert request["targets"] == ["zorbly", "wumbert"] and request["anchors"] == ["star", "triangle"]
    assert request["method"] == "erasepro" and request["preserve"] == ["quibbet"]
    assert request["options"] == {"form": "protected", "layers": "all", "ridge": 0.01, "rcond": 1e-4}
    REGISTRY["erasepro"].make_options(request["options"])
    with pytest.raises(Loaded):
        cli.main(argv)


def test_flags_win_over_the_config(tmp_path):
    text = (
        "pairs: [{target: zorbly, anchor: star}]\nmethod: uce\nprompts: '{}'\n"
        "options: {form: paper, ridge: 1e-2, rcond: 1e-3}\n"
    )
    argv = [*_config(tmp_path, text), "--method", "erasepro", "--option", "form=protected",
            "--template", "a picture of {}", "--target", "quibbet", "--anchor", "heart", "--preserve", "dog"]
    request = _request(argv)
    assert request["method"] == "erasepro" and request["prompts"] == ["a picture of {}"]
    assert request["options"] == {"form": "protected", "ridge": 0.01, "rcond": 1e-3}
    assert request["targets"] == ["quibbet", "zorbly"] and request["anchors"] == ["heart", "star"]
    assert request["preserve"] == ["dog"]


@pytest.mark.parametrize(
    "text, preserve",
    [
        ("pairs: [{target: zorbly, anchor: star}]\npreserve: dog\n", ["dog"]),
        ("pairs: [{target: zorbly, anchor: star}]\npreserve: [dog, quibbet]\n", ["dog", "quibbet"]),
        ("pairs: [{target: zorbly, anchor: star}]\n", []),
    ],
)
def test_yaml_preserve_may_be_one_string(tmp_path, text, preserve):
    request = _request(_config(tmp_path, text))
    assert (request["targets"], request["anchors"], request["preserve"]) == (["zorbly"], ["star"], preserve)


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
        ("just text\n", "expected a mapping"),
        ("1: x\npairs: [{target: a, anchor: b}]\n", "expected a mapping"),
        ("pairs: [unclosed\n", "not valid YAML"),
        ("pairs:\n\t- {target: a}\n", "not valid YAML"),
        ("pairs: &x [*x]\n", "pairs[0] must be"),  # a list holding itself
        (b"pairs: [{target: \xff}]\n", "cannot read the config"),
        ("pairs: [{target: a, anchor: b}]\nlayers: unet\n", "method options go under options: (e.g. options"),
        ("pairs: [{target: a, anchor: b}]\nweights: 2\n", "unknown key(s) weights: the top-level keys are"),
        ("pairs: [{target: a, anchor: b}]\nmethod: [uce]\n", "method must be a string"),
        ("pairs: [{target: a, anchor: b}]\nmethod: esd\n", "unknown method 'esd'"),
        ("pairs: [{target: a, anchor: b}]\nprompts: []\n", "prompts is empty"),
        ("pairs: [{target: a, anchor: b}]\nprompts: [1, 2]\n", "prompts must be a string or a list"),
        ("pairs: [{target: a, anchor: b}]\noptions: [layers, unet]\n", "options must be a mapping"),
        ("pairs: [{target: a, anchor: b}]\noptions: {ridge: abc}\n", "option ridge: expected float"),
        ("pairs: [{target: a, anchor: b}]\noptions: {layers: {a: 1}}\n", "option layers: expected str"),
        ("pairs: [{target: a, anchor: b}]\nmethod: uce\noptions: {form: paper}\n", "for method 'uce': form"),
    ],
)
def test_bad_yaml_configs_are_one_line_errors(tmp_path, capsys, text, message, no_load):
    assert cli.main(_config(tmp_path, text)) == 2
    assert _one_error_line(capsys, message).startswith(f"error: {tmp_path / 'erase.yaml'}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erase.yaml"]


def test_a_config_that_is_a_folder(tmp_path, capsys, no_load):
    assert cli.main(["erase", "--config", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "cannot read the config")


# --- generate ---------------------------------------------------------------------------------------------


def test_generate_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a red star", "--prompt", "a blue heart", "--images", "2", *FAST]
    mask = os.umask(0o022)
    try:
        assert cli.main([*argv, "--out", str(out)]) == 0
    finally:
        os.umask(mask)
    assert f"wrote {out.resolve()} (4 images: 2 prompts x 2)" in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    grid = np.asarray(Image.open(out))
    tile = (grid.shape[0] - 14 - 2) // 2 - 2  # two rows under the column labels
    assert grid.shape[1] > 2 * (tile + 2) + 2 + 7 * len("a blue heart")  # a label margin left of the rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{tmp}"], "is a folder (give a .png file"),
        (["--out", "{tmp}/new/"], "is a folder (give a .png file"),
        (["--out", "{tmp}/grid.jpg"], "expected a .png file"),
        (["--out", "{tmp}/notes.txt/grid.png"], "is a file, not a folder"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["--images", "0"], "argument --images: expected an integer >= 1"),
        (["--guidance", "inf"], "argument --guidance: expected a finite number"),
        (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such file or folder"),
    ],
)
def test_bad_generate_arguments_are_one_line_before_loading(argv, message, tmp_path, capsys, no_load):
    (tmp_path / "notes.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["generate", "--prompt", "a red star", *argv]) == 2
    _one_error_line(capsys, message.replace("{tmp}", str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- report and evaluate ----------------------------------------------------------------------------------


def test_report_of_a_missing_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    _one_error_line(capsys, "no report at")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"targets": "cat", "anchors": []}', "targets must be a list of strings"),
        ('{"targets": ["cat"], "anchors": [""], "layers": [{"key": "k"}]}', "layers[0] must hold key, "),
        ('{"targets": ["cat"], "anchors": [""], "layers": {}}', "layers must be a list"),
        ('{"targets": ["cat"], "anchors": [""], "notes": 3}', "notes must be a list"),
    ],
)
def test_a_malformed_report_is_one_line(tmp_path, capsys, text, message, no_load):
    (tmp_path / "report.json").write_text(text)
    for argv in (["report", str(tmp_path)], ["evaluate", "--erased", str(tmp_path)]):
        assert cli.main(argv) == 2
        assert message in _one_error_line(capsys, f"{tmp_path / 'report.json'}: not an erase report (")


def test_bad_evaluate_arguments_are_one_line_before_loading(tmp_path, capsys, no_load):
    assert cli.main(["evaluate", "--erased", str(tmp_path)]) == 2
    _one_error_line(capsys, "no --target given and no erase report")
    assert cli.main(["evaluate", "--erased", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys, "--erased")
    assert cli.main(["evaluate", "--erased", str(tmp_path), "--target", "a", "--images", "0"]) == 2
    _one_error_line(capsys, "argument --images: expected an integer >= 1")


# --- the console script -----------------------------------------------------------------------------------


def test_console_script_turns_the_compilation_cache_on(monkeypatch):
    calls = []
    monkeypatch.setattr("jax_erasepro.compile_cache.use_compilation_cache", lambda: calls.append("cache"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    assert cli.run() == 0
    assert calls == ["cache", "main"]


def test_commands_print_no_pytorch_warning_and_need_no_torch():
    code = "import sys; sys.modules['torch'] = None  # as if torch were not installed\n"
    code += "from jax_erasepro.cli import main; sys.exit(main(['methods']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PyTorch" not in done.stderr and "erasepro-implicit" in done.stdout
