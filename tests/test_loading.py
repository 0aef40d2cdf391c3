"""load_pretrained on diffusers folders written by diffusers itself, and its errors on bad input."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from jax_erasepro.loading import load_pretrained
from jax_erasepro.models.config import ConfigError
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.tokenizer import tokenize
from jax_erasepro.weights import WeightsError, to_state_dict
from tests.conftest import assert_same_params
from tests.torch_bridge import torch_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=1)


@pytest.fixture(scope="module")
def folder(sd, tmp_path_factory):
    """A diffusers folder written by diffusers' own save_pretrained."""
    path = tmp_path_factory.mktemp("sd") / "model"
    torch_pipeline(sd).save_pretrained(path)
    return path


@pytest.fixture
def copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_loads_diffusers_folder_exactly(sd, folder):
    loaded = load_pretrained(folder)
    assert_same_params(sd, loaded)
    assert loaded.config.unet == sd.config.unet
    assert loaded.config.vae.scaling_factor == pytest.approx(0.18215)
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.source.format == "diffusers"


@pytest.mark.parametrize("with_prefix", [True, False])
def test_text_encoder_keys_with_or_without_text_model_prefix(sd, copy, with_prefix):
    path = copy / "text_encoder" / "model.safetensors"
    tensors = {k.removeprefix("text_model."): v for k, v in load_file(path).items()}
    if with_prefix:
        tensors = {"text_model." + k: v for k, v in tensors.items()}
    save_file(tensors, path)
    loaded = load_pretrained(copy)
    assert loaded.source.components["text_encoder"]["key_prefix"] == ("text_model." if with_prefix else "")
    assert_same_params(sd, loaded)


def test_fp16_variant(sd, copy):
    for comp, stem in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        src = copy / comp / f"{stem}.safetensors"
        half = {k: v.astype(np.float16) for k, v in load_file(src).items()}
        save_file(half, copy / comp / f"{stem}.fp16.safetensors")
        src.unlink()
    loaded = load_pretrained(copy)  # falls back to the fp16 files
    ref = to_state_dict(sd.unet)
    got = to_state_dict(loaded.unet)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k].astype(np.float16).astype(np.float32))
    assert load_pretrained(copy, variant="fp16", dtype="float16").unet.conv_in.kernel.dtype == np.float16


def test_missing_file(copy):
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vae/diffusion_pytorch_model.safetensors"):
        load_pretrained(copy)


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="unet/diffusion_pytorch_model.safetensors"):
        load_pretrained(copy)


def test_corrupted_header(copy):
    path = copy / "text_encoder" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="text_encoder/model.safetensors"):
        load_pretrained(copy)


def test_wrong_shape_and_missing_key_and_nan(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    bad = dict(tensors, **{"conv_in.weight": np.zeros((32, 4, 1, 1), np.float32)})
    save_file(bad, path)
    with pytest.raises(WeightsError, match="'conv_in.weight' has shape"):
        load_pretrained(copy)
    save_file({k: v for k, v in tensors.items() if k != "conv_in.bias"}, path)
    with pytest.raises(WeightsError, match="missing key 'conv_in.bias'"):
        load_pretrained(copy)
    nan = dict(tensors, **{"conv_out.bias": np.full_like(tensors["conv_out.bias"], np.nan)})
    save_file(nan, path)
    with pytest.raises(WeightsError, match="'conv_out.bias' holds NaN"):
        load_pretrained(copy)


def test_unsupported_block_type_and_unknown_key(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        load_pretrained(copy)
    cfg_path.write_text(json.dumps(dict(cfg, my_new_option=3)))
    with pytest.raises(ConfigError, match="my_new_option"):
        load_pretrained(copy)


def test_pickled_only_is_refused(copy):
    path = copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.rename(path.with_suffix(".bin"))
    with pytest.raises(WeightsError, match="safetensors only"):
        load_pretrained(copy)


def test_prompt_over_77_tokens_is_truncated_with_a_warning(sd):
    long = "a red star " * 40
    with pytest.warns(UserWarning, match="truncat"):
        ids = tokenize(sd.tokenizer, [long])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_file_tensor_reads_exactly_its_bytes_and_refuses_a_short_file(tmp_path):
    """``FileTensor`` copies one tensor straight from the file; a file cut short after its header was read
    (so the header check could not see it) fails with the file named, not with garbage."""
    from jax_erasepro.loading import SafetensorsReader

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float16), "b": rng.normal(size=(7,)).astype(np.float32)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    for key, want in tensors.items():
        lazy = reader.lazy(key)
        assert (lazy.shape, lazy.dtype) == (want.shape, want.dtype)
        np.testing.assert_array_equal(np.asarray(lazy), want)
        out = np.empty_like(want)
        lazy.read_into(out)
        np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="contiguous"):
        reader.lazy("a").read_into(np.empty((5, 3), np.float16).T)
    seen = []  # with a check, pieces of about chunk_bytes, each checked once, in order
    out = np.empty_like(tensors["a"])
    assert reader.lazy("a").read_into(out, lambda p: seen.append(p.copy()) is None, chunk_bytes=8)
    assert [p.size for p in seen] == [4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(seen), tensors["a"].reshape(-1))
    np.testing.assert_array_equal(out, tensors["a"])
    assert not reader.lazy("a").read_into(out, lambda p: p.size < 4, chunk_bytes=8)  # False at a bad piece
    last = max(tensors, key=lambda k: reader.lazy(k).offset)
    with open(path, "r+b") as f:
        f.truncate(reader.lazy(last).offset + 2)
    with pytest.raises(WeightsError, match="ends inside a tensor"):
        np.asarray(reader.lazy(last))


def test_a_file_cut_short_while_open_is_an_error_not_sigbus(tmp_path):
    """The reader validated the header, then the file shrinks (another process, a full disk): every read
    fails with WeightsError naming the file. A memory map would have killed the process with SIGBUS."""
    from jax_erasepro.loading import SafetensorsReader

    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones((64, 64), np.float32), "b": np.ones(8, np.float32)}, str(path))
    reader = SafetensorsReader(path)
    with open(path, "r+b") as f:
        f.truncate(reader.lazy("a").offset + 16)
    for key in ("a", "b"):
        with pytest.raises(WeightsError, match="m.safetensors: the file ends inside a tensor"):
            reader[key]


# --- strict safetensors headers: every violation a WeightsError naming the file (and the tensor) -----------


def _small_file(path):
    """A valid two-tensor file (``b`` first in the data, then ``a``), its header and its data bytes."""
    save_file({"a": np.arange(15, dtype=np.float16).reshape(3, 5), "b": np.arange(7, dtype=np.float32)}, path)
    raw = path.read_bytes()
    (n,) = np.frombuffer(raw[:8], np.uint64)
    return json.loads(raw[8 : 8 + int(n)]), raw[8 + int(n) :]


def _write(path, header, data, length=None):
    """A file of ``header`` (an object, or raw bytes) and ``data``; ``length`` overrides the length prefix."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = np.uint64(len(blob) if length is None else length).tobytes()
    path.write_bytes(prefix + blob + data)


def _entry(header, key, **changes):
    return {**header, key: {**header[key], **changes}}


HEADER_CASES = {
    "negative offsets": (lambda h, d: (_entry(h, "a", data_offsets=[-2, 28]), d), "'a'.*data_offsets"),
    "overlapping offsets": (lambda h, d: (_entry(h, "a", data_offsets=[0, 30]), d), "'a'.*gap or overlap"),
    "a gap": (lambda h, d: (_entry(h, "a", data_offsets=[32, 62]), d + bytes(4)), "'a'.*gap or overlap"),
    "trailing bytes": (lambda h, d: (h, d + bytes(10)), "cover 58 of the 68 data bytes"),
    "end before begin": (lambda h, d: (_entry(h, "a", data_offsets=[58, 28]), d), "'a'.*do not hold"),
    "size mismatch": (lambda h, d: (_entry(h, "a", shape=[3, 4]), d), "'a'.*do not hold a F16"),
    "unknown dtype": (lambda h, d: (_entry(h, "a", dtype="F8"), d), "unsupported safetensors dtype 'F8'"),
    "dtype not a string": (lambda h, d: (_entry(h, "a", dtype=["F16"]), d), "unsupported safetensors dtype"),
    "shape of strings": (lambda h, d: (_entry(h, "a", shape=["3", 5]), d), "'a'.*shape"),
    "shape of booleans": (lambda h, d: (_entry(h, "a", shape=[True, 15]), d), "'a'.*shape"),
    "negative dimension": (lambda h, d: (_entry(h, "a", shape=[-3, -5]), d), "'a'.*shape"),
    "offsets of floats": (lambda h, d: (_entry(h, "a", data_offsets=[28.0, 58.0]), d), "'a'.*data_offsets"),
    "three offsets": (lambda h, d: (_entry(h, "a", data_offsets=[28, 58, 60]), d), "'a'.*data_offsets"),
    "missing field": (lambda h, d: ({**h, "a": {"dtype": "F16", "shape": [3, 5]}}, d), "'a'.*needs"),
    "entry not a mapping": (lambda h, d: ({**h, "a": [1, 2]}, d), "'a'.*needs"),
    "metadata not strings": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
    "header a list": (lambda h, d: (b"[]", d), "not a JSON object"),
    "header a number": (lambda h, d: (b"12345678", d), "not a JSON object"),
    "nested 200k deep": (lambda h, d: (b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", d), "too deep"),
    "invalid JSON": (lambda h, d: (b'{"a": ', d), "Expecting value"),
    "duplicate key": (lambda h, d: (b'{"x": 1, "x": 2}', d), "'x' appears twice"),
    "not UTF-8": (lambda h, d: (b'{"\xff": 1}', d), "utf-8"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_headers_are_refused(tmp_path, case):
    from safetensors import safe_open

    from jax_erasepro.loading import SafetensorsReader

    path = tmp_path / "t.safetensors"
    header, data = _small_file(path)
    mutate, message = HEADER_CASES[case]
    _write(path, *mutate(header, data))
    with pytest.raises(WeightsError, match=f"t.safetensors: not a readable safetensors file.*{message}") as e:
        SafetensorsReader(path)
    assert "\n" not in str(e.value)
    with pytest.raises(Exception), safe_open(path, "np") as f:  # noqa: B017 - the library refuses it too
        [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118


@pytest.mark.parametrize(
    "length, data, message",
    [(None, b"", "shorter"), (2**63, b"", "header of"), (10**9, bytes(100), "header of")],
    ids=["empty file", "huge length", "length past the end"],
)
def test_bad_safetensors_lengths_are_refused(tmp_path, length, data, message):
    from jax_erasepro.loading import SafetensorsReader

    path = tmp_path / "t.safetensors"
    if length is None:
        path.write_bytes(b"\x01\x02")
        message = "2-byte file has no header"
    else:
        _write(path, b"{}", data, length=length)
    with pytest.raises(WeightsError, match=f"t.safetensors.*{message}"):
        SafetensorsReader(path)


def test_a_bad_header_in_a_model_folder_names_file_and_tensor(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    raw = path.read_bytes()
    (n,) = np.frombuffer(raw[:8], np.uint64)
    header, data = json.loads(raw[8 : 8 + int(n)]), raw[8 + int(n) :]
    key = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] > 0)
    begin, end = header[key]["data_offsets"]
    _write(path, _entry(header, key, data_offsets=[begin - 4, end - 4]), data)  # reads a neighbour's bytes
    with pytest.raises(WeightsError, match=f"diffusion_pytorch_model.safetensors.*'{key}'.*overlap"):
        load_pretrained(copy)


# a JSON value, to put anywhere in a header
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-70, 70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_FIELDS = ("dtype", "shape", "data_offsets")


@st.composite
def _mutated(draw, header: dict, data: bytes):
    """A header and data with one to three random changes: a field replaced by any JSON value, an offset or
    dimension nudged, an entry dropped or added, bytes added or cut, or the whole header replaced."""
    header, data, length = json.loads(json.dumps(header)), data, None
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(header, dict):  # replaced whole by another JSON value
            break
        kind = draw(st.sampled_from(["field", "nudge", "drop", "add", "data", "whole", "length"]))
        key = draw(st.sampled_from(["a", "b", "__metadata__"]))
        entry = header.get(key)
        if kind == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from([*_FIELDS, "format", "extra"]))] = draw(_JSON)
        elif kind == "nudge" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            field = draw(st.sampled_from(["shape", "data_offsets"]))
            if isinstance(entry.get(field), list) and entry[field]:
                i = draw(st.integers(0, len(entry[field]) - 1))
                if isinstance(entry[field][i], int):
                    entry[field][i] += draw(st.integers(-32, 32))
        elif kind == "drop":
            header.pop(key, None)
        elif kind == "add":
            header[draw(st.text(max_size=3))] = draw(_JSON)
        elif kind == "data":
            cut = draw(st.integers(-len(data), 16))
            data = data[:cut] if cut < 0 else data + bytes(cut)
        elif kind == "whole":
            header = draw(_JSON)
        elif kind == "length":
            length = draw(st.integers(0, 2**64 - 1))
    return header, data, length


def test_mutated_headers_load_exactly_or_fail_clearly(tmp_path_factory):
    """Property: whatever is done to a small valid file's header, our reader either raises WeightsError
    naming the file, or loads exactly what the safetensors library loads from it; never anything else."""
    from safetensors.numpy import load_file as reference_load

    from jax_erasepro.loading import SafetensorsReader

    path = tmp_path_factory.mktemp("headers") / "t.safetensors"
    header, data = _small_file(path)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(_mutated(header, data))
    def check(case):
        _write(path, json.dumps(case[0]).encode(), case[1], length=case[2])
        try:
            reader = SafetensorsReader(path)
            got = {k: np.asarray(reader.lazy(k)) for k in reader.keys}
            mapped = {k: np.array(reader[k]) for k in reader.keys}
        except WeightsError as e:
            assert "t.safetensors" in str(e) and "\n" not in str(e)
            return
        want = reference_load(str(path))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            assert got[k].tobytes() == want[k].tobytes() == mapped[k].tobytes()

    check()
