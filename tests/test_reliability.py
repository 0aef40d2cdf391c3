"""Nothing lost, ever: overwrite deletes only our own outputs, concurrent saves cannot interleave, a killed
save leaves the old or the new model and its leftovers are cleaned, symlinked sources are protected, values
are checked on save. Each case counts in docs/reliability.md's corpus."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from jax_erasepro import safefiles, surgery
from jax_erasepro.loading import load_pretrained
from jax_erasepro.saving import foreign_reason, save_pretrained
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import to_state_dict
from tests.conftest import assert_same_params

ROOT = Path(__file__).parent.parent
ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=1)


@pytest.fixture(scope="module")
def other():
    return tiny_random_sd(seed=2)


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) with its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _edited(sd, value: float = 0.5):
    """``sd`` with one attn2.to_k weight shifted, for delta and LoRA outputs."""
    key = ATTN2_K
    return surgery.replace(sd, {f"unet.{key}": to_state_dict(sd.unet)[key] + value})


# --- 1. overwrite replaces only an output of ours ----------------------------------------------------------


def _project(root: Path) -> Path:
    """The issue's folder: a user's work, with no model in it."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "data").mkdir()
    (root / "data" / "results.csv").write_text("a,b\n1,2\n")
    (root / "NOTES.md").write_text("notes\n")
    return root


def test_overwrite_refuses_a_folder_of_other_files(sd, tmp_path):
    root = _project(tmp_path / "work")
    before = _digest(root)
    with pytest.raises(safefiles.DestinationError, match=f"refusing to overwrite {root}"):
        save_pretrained(sd, root, overwrite=True)
    assert _digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("extra", ["NOTES.md", "unet/notes.txt", "tokenizer/mine/vocab.txt"])
def test_overwrite_refuses_our_folder_with_a_foreign_file(sd, tmp_path, extra):
    out = save_pretrained(sd, tmp_path / "model")
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    (out / extra).write_text("mine")
    before = _digest(out)
    with pytest.raises(safefiles.DestinationError, match=f"it holds {extra}"):
        save_pretrained(sd, out, overwrite=True, format="orbax")
    assert _digest(out) == before


def test_overwrite_refuses_a_file_we_did_not_write(sd, tmp_path):
    theirs = tmp_path / "theirs.safetensors"
    save_file({"x": np.ones(3, np.float32)}, str(theirs))
    text = tmp_path / "text.safetensors"
    text.write_text("my thesis")
    for path, reason in ((theirs, "did not write"), (text, "not a safetensors file")):
        before = path.read_bytes()
        with pytest.raises(safefiles.DestinationError, match=reason):
            save_pretrained(sd, path, format="single_file", overwrite=True)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.safetensors", "theirs.safetensors"]


@pytest.mark.parametrize(
    "first, second",
    [("diffusers", "orbax"), ("orbax", "diffusers"), ("delta", "lora"), ("lora", "delta")],
)
def test_overwrite_replaces_each_of_our_formats(sd, tmp_path, first, second):
    edited = _edited(sd)
    out = save_pretrained(edited, tmp_path / "out", format=first, base=sd)
    assert foreign_reason(out) is None
    save_pretrained(edited, out, format=second, base=sd, overwrite=True)
    assert foreign_reason(out) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 2 and 6. concurrent writers: one wins, the other is told; nothing interleaves -------------------------


def _in_lockstep(monkeypatch, n: int = 2) -> None:
    """Make ``n`` concurrent saves all finish writing before any puts its output in place."""
    barrier, fsync = threading.Barrier(n, timeout=60), safefiles._fsync_tree

    def synced(root):
        fsync(root)
        if not root.name.startswith(".model."):  # the command line's inner save_pretrained
            barrier.wait()

    monkeypatch.setattr(safefiles, "_fsync_tree", synced)


def _race(*jobs):
    """Run the jobs in threads at once; each result is its return value or the exception it raised."""
    results = [None] * len(jobs)

    def run(i, job):
        try:
            results[i] = job()
        except BaseException as e:  # noqa: BLE001 - the result under test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_savers_to_one_new_destination(sd, other, tmp_path, monkeypatch):
    _in_lockstep(monkeypatch)
    out = tmp_path / "same"
    results = _race(lambda: save_pretrained(sd, out), lambda: save_pretrained(other, out))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], FileExistsError), results
    assert "written by another save" in str(errors[0])
    winner = sd if isinstance(results[0], Path) else other
    assert_same_params(load_pretrained(out), winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_two_overwriters_leave_one_whole_model(sd, other, tmp_path, monkeypatch):
    out = save_pretrained(sd, tmp_path / "same")
    _in_lockstep(monkeypatch)
    results = _race(
        lambda: save_pretrained(other, out, overwrite=True),
        lambda: save_pretrained(other, out, overwrite=True, format="orbax"),
    )
    assert all(r == out for r in results), results
    assert foreign_reason(out) is None
    assert_same_params(load_pretrained(out), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_two_command_line_erases_to_one_out(tmp_path, monkeypatch, capsys):
    from jax_erasepro import cli
    from jax_erasepro.erase.report import EraseReport

    _in_lockstep(monkeypatch)
    plot, lock = EraseReport.plot, threading.Lock()  # matplotlib draws from one thread at a time

    def locked_plot(self, path):
        with lock:
            plot(self, path)

    monkeypatch.setattr(EraseReport, "plot", locked_plot)
    monkeypatch.setattr(cli, "_quick_evaluation", lambda *a, **k: None, raising=False)  # not under test
    out = tmp_path / "same"
    common = ["erase", "--anchor", "star", "--steps", "1", "--scale", "1", "--out", str(out)]
    codes = _race(*(lambda t=t: cli.main([*common, "--target", t]) for t in ("zorbly", "dot")))
    assert sorted(codes) == [0, 2], codes
    err = capsys.readouterr().err
    assert str(out) in err and "written by another" in err  # the wording is cli.py's
    assert {"model", "report.json", "report.png", "before_after.png"} <= {p.name for p in out.iterdir()}
    load_pretrained(out / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


# --- 10. a killed save leaves the old or the new model; the next save cleans its leftovers -----------------

_KILL_BETWEEN_RENAMES = """
import os, sys
from jax_erasepro.saving import save_pretrained
from jax_erasepro.tiny import tiny_random_sd
out, real, moved = sys.argv[1], os.rename, []
def rename(src, dst, *a, **kw):
    if moved:  # the destination was moved away: die before the new copy takes its place
        os._exit(9)
    moved.extend([1] if os.fspath(src) == out else [])
    return real(src, dst, *a, **kw)
os.rename = rename
save_pretrained(tiny_random_sd(seed=2), out, overwrite=True)
"""


def test_a_save_killed_while_replacing_leaves_a_model(sd, other, tmp_path):
    out = save_pretrained(sd, tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out)], env=env, check=False)
    loaded = load_pretrained(out)  # the old or the new model, whole
    try:
        assert_same_params(loaded, other)
    except AssertionError:
        assert_same_params(loaded, sd)
    save_pretrained(sd, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_killed_saves_are_cleaned_by_the_next_save(sd, other, tmp_path):
    out = save_pretrained(sd, tmp_path / "model")
    old = tmp_path / ".model.old-0000dead"
    out.rename(old)  # killed between the two renames of an overwrite: only the old copy is left
    (tmp_path / ".model.tmp-0000beef").mkdir()  # a killed save's half-written temporary
    (tmp_path / ".model.tmp-0000beef" / "model_index.json").write_text("{")
    with pytest.raises(FileExistsError):  # the old copy is back in place, so a plain save refuses
        save_pretrained(other, out)
    assert_same_params(load_pretrained(out), sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_live_writers_temporary_is_left_alone(sd, tmp_path):
    live = tmp_path / ".model.tmp-0000live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_pretrained(sd, tmp_path / "model")
        assert live.is_dir()
    finally:
        os.close(fd)
    save_pretrained(sd, tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_no_renameat2_still_replaces(sd, other, tmp_path, monkeypatch):
    out = save_pretrained(sd, tmp_path / "model")
    monkeypatch.setattr(safefiles, "_renameat2", lambda *a: False)
    save_pretrained(other, out, overwrite=True)
    single = save_pretrained(sd, tmp_path / "sd.safetensors", format="single_file")
    save_pretrained(other, single, format="single_file", overwrite=True)
    assert_same_params(load_pretrained(out), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sd.safetensors"]


# --- 3. a source reached through symlinks is protected ------------------------------------------------------


def test_a_folder_of_symlinks_protects_its_targets(sd, tmp_path):
    real = save_pretrained(sd, tmp_path / "B")
    links = tmp_path / "M"  # the Hugging Face cache layout: a snapshot folder of links to blobs
    for path in real.rglob("*"):
        if path.is_file():
            (links / path.relative_to(real)).parent.mkdir(parents=True, exist_ok=True)
            (links / path.relative_to(real)).symlink_to(path)
    before = _digest(real)
    model = load_pretrained(links)
    for fmt in ("orbax", "diffusers"):
        with pytest.raises(safefiles.DestinationError, match="source model"):
            save_pretrained(model, real, overwrite=True, format=fmt)
    with pytest.raises(safefiles.DestinationError, match="source model"):
        save_pretrained(model, real / "unet", overwrite=True)
    assert _digest(real) == before
    assert_same_params(load_pretrained(links), sd)


# --- 7. values are checked on save --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, dtype, message",
    [(np.nan, None, "NaN or inf"), (np.inf, None, "NaN or inf"), (1e6, "float16", "overflows float16")],
)
def test_save_refuses_values_the_file_cannot_hold(sd, tmp_path, value, dtype, message):
    state = to_state_dict(sd.unet)
    bad = surgery.replace(sd, {f"unet.{ATTN2_K}": np.full_like(state[ATTN2_K], value)})
    outputs = [("diffusers", "out"), ("single_file", "out.safetensors"), ("orbax", "out")]
    outputs = outputs if dtype is None else outputs[:2]  # orbax keeps the params' own dtype
    for fmt, name in outputs:
        with pytest.raises(ValueError, match=f"{ATTN2_K.split('.')[-2]}.*{message}"):
            save_pretrained(bad, tmp_path / name, format=fmt, dtype=dtype)
    assert list(tmp_path.iterdir()) == []


# --- 9. convert.ckpt never writes onto its input, nor over a file without --overwrite ----------------------


def _ckpt(path: Path, value: float = 1.0) -> Path:
    import torch

    torch.save({"state_dict": {"w": torch.full((3,), value), "n": torch.tensor(7)}}, path)
    return path


def test_convert_ckpt_refuses_its_own_input(tmp_path, capsys):
    from convert.ckpt import main

    src = _ckpt(tmp_path / "x.ckpt")
    (tmp_path / "x.safetensors").symlink_to(src)
    before = src.read_bytes()
    for dst in ("x.ckpt", "x.safetensors"):
        with pytest.raises(SystemExit) as e:
            main([str(src), str(tmp_path / dst)])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "name it *.safetensors" in err and "would overwrite the source model" in err
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt", "x.safetensors"]


def test_convert_ckpt_overwrites_only_when_asked_and_only_its_own(tmp_path, capsys):
    from safetensors.numpy import load_file

    from convert.ckpt import main

    dst = tmp_path / "x.safetensors"
    main([str(_ckpt(tmp_path / "a.ckpt", 1.0)), str(dst)])
    first = dst.read_bytes()
    with pytest.raises(SystemExit):
        main([str(_ckpt(tmp_path / "b.ckpt", 2.0)), str(dst)])
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == first
    main([str(tmp_path / "b.ckpt"), str(dst), "--overwrite"])
    np.testing.assert_array_equal(load_file(str(dst))["w"], np.full(3, 2.0, np.float32))
    theirs = tmp_path / "theirs.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(theirs))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "b.ckpt"), str(theirs), "--overwrite"])
    assert "did not write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(_ckpt(tmp_path / "nan.ckpt", float("nan"))), str(tmp_path / "nan.safetensors")])
    assert "'w' holds NaN" in capsys.readouterr().err
    names = ["a.ckpt", "b.ckpt", "nan.ckpt", "theirs.safetensors", "x.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_bfloat16_files_are_written(sd, tmp_path):
    import ml_dtypes
    from safetensors import safe_open

    out = save_pretrained(sd, tmp_path / "bf16.safetensors", format="single_file", dtype=ml_dtypes.bfloat16)
    with safe_open(out, "np") as f:
        key = next(iter(f.keys()))
        assert f.get_slice(key).get_dtype() == "BF16"
    load_pretrained(out, config=save_pretrained(sd, tmp_path / "cfg"))


# --- 11 and 12. one clear line for every bad input: configs, dtype, markers, full disk, read-only, ints --


@pytest.fixture(scope="module")
def saved(sd, tmp_path_factory):
    return save_pretrained(sd, tmp_path_factory.mktemp("saved") / "model")


def _one_line(e: BaseException, *names: str) -> None:
    assert "\n" not in str(e) and all(n in str(e) for n in names), str(e)


BAD_FILES = [
    ("model_index.json", b'{"unet": ', "not valid JSON"),
    ("model_index.json", b'{"unet": "\xff"}', "not UTF-8"),
    ("unet/config.json", b"[1, 2]", "holds a JSON list"),
    ("text_encoder/config.json", b"{", "not valid JSON"),
    ("tokenizer/tokenizer.json", b'{"model": ', "not valid JSON"),
    ("tokenizer/tokenizer_config.json", b"\xff\xfe", "not UTF-8"),
]


@pytest.mark.parametrize("rel, content, message", BAD_FILES, ids=[f"{r}: {m}" for r, _, m in BAD_FILES])
def test_broken_json_names_the_file(saved, tmp_path, rel, content, message):
    from jax_erasepro.errors import LoadError

    model = tmp_path / "model"
    shutil.copytree(saved, model)
    (model / rel).write_bytes(content)
    with pytest.raises(LoadError, match=message) as e:
        load_pretrained(model)
    _one_line(e.value, str(model / rel))


BAD_VALUES = [
    ("vae/config.json", "norm_num_groups", 0, "must be at least 1"),
    ("unet/config.json", "block_out_channels", [32, None], "wrong type"),
    ("unet/config.json", "in_channels", "four", "wrong type"),
    ("text_encoder/config.json", "hidden_size", None, "wrong type"),
]


@pytest.mark.parametrize("rel, key, value, message", BAD_VALUES, ids=[f"{b[1]}={b[2]!r}" for b in BAD_VALUES])
def test_bad_config_values_name_file_and_key(saved, tmp_path, rel, key, value, message):
    from jax_erasepro.errors import ConfigError

    model = tmp_path / "model"
    shutil.copytree(saved, model)
    cfg = json.loads((model / rel).read_text())
    (model / rel).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConfigError, match=message) as e:
        load_pretrained(model)
    _one_line(e.value, str(model / rel), key)


def test_a_non_float_dtype_is_refused(saved):
    from jax_erasepro.errors import LoadError

    for dtype in ("int8", "nope"):
        with pytest.raises(LoadError, match=f"dtype='{dtype}'") as e:
            load_pretrained(saved, dtype=dtype)
        _one_line(e.value, "float32")


def test_integer_tensors_are_refused_naming_the_key(saved, tmp_path):
    from safetensors.numpy import load_file

    model = tmp_path / "model"
    shutil.copytree(saved, model)
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    save_file(dict(tensors, **{"conv_in.bias": tensors["conv_in.bias"].astype(np.int32)}), str(path))
    from jax_erasepro.weights import WeightsError

    with pytest.raises(WeightsError, match="'conv_in.bias' holds int32 values") as e:
        load_pretrained(model)
    _one_line(e.value, str(path))


@pytest.mark.parametrize(
    "content", [b"{", b"[]", b'{"format": "jax_erasepro.delta", "edited": "unet.x"}'], ids=str
)
def test_a_malformed_delta_record_names_the_file(sd, tmp_path, content):
    from jax_erasepro.delta import apply_delta
    from jax_erasepro.errors import LoadError

    out = save_pretrained(_edited(sd), tmp_path / "delta", format="delta", base=sd)
    (out / "delta.json").write_bytes(content)
    with pytest.raises(LoadError) as e:
        apply_delta(sd, out)
    _one_line(e.value, str(out / "delta.json"))


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"format": "jax_erasepro.orbax"}'], ids=str)
def test_a_malformed_orbax_marker_names_the_file(sd, tmp_path, content):
    from jax_erasepro.errors import LoadError

    out = save_pretrained(sd, tmp_path / "orbax", format="orbax")
    (out / "jax_erasepro_orbax.json").write_bytes(content)
    with pytest.raises(LoadError) as e:
        load_pretrained(out)
    _one_line(e.value, str(out / "jax_erasepro_orbax.json"))


def _mounted_tmpfs(path: Path, size: int) -> bool:
    path.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def test_a_full_disk_while_writing_orbax_is_one_line(sd, tmp_path, monkeypatch, capfd):
    """A small tmpfs where the configs fit and the params do not (or, where mounting is not allowed, orbax's
    write raising ENOSPC): one SaveError naming the destination, nothing left, no flood of tracebacks."""
    full = save_pretrained(sd, tmp_path / "sized", format="orbax")
    small = sum(p.stat().st_size for p in full.rglob("*") if p.is_file() and "params" not in p.parts)
    disk = tmp_path / "disk"
    mounted = _mounted_tmpfs(disk, small + (1 << 16))
    if not mounted:
        import orbax.checkpoint as ocp

        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ocp.StandardCheckpointer, "save", no_space)
    capfd.readouterr()
    try:
        with pytest.raises(safefiles.SaveError, match="No space left on device") as e:
            save_pretrained(sd, disk / "model", format="orbax")
        _one_line(e.value, str(disk / "model"))
        assert ".tmp-" not in str(e.value) and list(disk.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    assert len(capfd.readouterr().err.splitlines()) <= 2


@pytest.mark.parametrize("fmt, name", [("diffusers", "model"), ("single_file", "m.safetensors")])
def test_a_read_only_destination_names_it(sd, tmp_path, monkeypatch, fmt, name):
    """A folder we may not write into: one SaveError naming what the user asked for, not our temporary.
    (As root, permissions do not stop writes, so the file system's refusal is simulated.)"""
    import errno

    place = tmp_path / "ro"
    place.mkdir()
    place.chmod(0o555)
    if os.geteuid() == 0:
        real_mkdir, real_open = os.mkdir, os.open

        def refuse(real):
            def call(path, *args, **kwargs):
                if Path(path).parent == place:
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
                return real(path, *args, **kwargs)

            return call

        monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
        monkeypatch.setattr(os, "open", refuse(real_open))
    try:
        with pytest.raises(safefiles.SaveError) as e:
            save_pretrained(sd, place / name, format=fmt)
    finally:
        place.chmod(0o755)
    _one_line(e.value, str(place / name))
    assert ".tmp-" not in str(e.value) and ".new-" not in str(e.value)
    assert list(place.iterdir()) == []
