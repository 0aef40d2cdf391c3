"""save_pretrained (diffusers / single_file / orbax / delta), checked against diffusers itself; atomicity."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jax_erasepro import safefiles, surgery
from jax_erasepro.compvis import diffusers_to_compvis
from jax_erasepro.delta import DeltaError, apply_delta
from jax_erasepro.loading import load_pretrained
from jax_erasepro.pipeline import generate
from jax_erasepro.saving import save_pretrained
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import WeightsError, to_state_dict
from tests.conftest import assert_same_params
from tests.torch_bridge import TOKENIZER, torch_pipeline

WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=1)


def _diffusers_folder(sd, path: Path, dtype=torch.float32, text_prefix=False) -> Path:
    """A folder written by diffusers' own save_pretrained; optionally the older text encoder key form."""
    torch_pipeline(sd).to(dtype).save_pretrained(path)
    if text_prefix:  # transformers < 5 form: ``text_model.`` prefix plus the int64 position_ids buffer
        file = path / WEIGHTS["text_encoder"]
        tensors = {"text_model." + k: v for k, v in load_file(file).items()}
        tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def src(sd, tmp_path_factory):
    return _diffusers_folder(sd, tmp_path_factory.mktemp("src") / "model")


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _assert_files_identical(a: Path, b: Path) -> None:
    """Every tensor in each weight file: same keys, same dtype, same bytes."""
    for rel in WEIGHTS.values():
        with safe_open(a / rel, "np") as fa, safe_open(b / rel, "np") as fb:
            keys = fa.keys()
            assert set(keys) == set(fb.keys()), rel
            for k in keys:
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                assert x.dtype == y.dtype and x.shape == y.shape, k
                assert x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize(
    "dtype, prefix", [(torch.float32, False), (torch.float16, False), (torch.float32, True)], ids=str
)
def test_diffusers_round_trip_is_bit_identical(sd, tmp_path, dtype, prefix):
    source = _diffusers_folder(sd, tmp_path / "src", dtype, prefix)
    out = save_pretrained(load_pretrained(source), tmp_path / "out")
    _assert_files_identical(source, out)


def test_in_memory_model_exports_float32(sd, tmp_path):
    out = save_pretrained(sd, tmp_path / "out")
    with safe_open(out / WEIGHTS["unet"], "np") as f:
        keys = f.keys()
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F32"}


def _images_both_ways(sd, folder: Path):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=3, height=16, width=16)
    ours = generate(sd, "a red star", latents=latents, **kw)
    with torch.no_grad():
        ref = pipe("a red star", latents=torch.from_numpy(latents), output_type="np", **kw).images
    return ours, (ref * 255).round().astype(np.uint8)


def test_exported_folder_generates_in_diffusers(sd, tmp_path):
    out = save_pretrained(sd, tmp_path / "out")
    ours, ref = _images_both_ways(sd, out)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_orbax_round_trip(src, tmp_path):
    loaded = load_pretrained(src)
    orbax_dir = save_pretrained(loaded, tmp_path / "orbax", format="orbax")
    back = load_pretrained(orbax_dir)
    assert back.source.format == "orbax"
    assert (back.config.unet, back.config.vae, back.config.text_encoder) == (
        loaded.config.unet,
        loaded.config.vae,
        loaded.config.text_encoder,
    )
    assert_same_params(loaded, back)
    # the source's key forms and dtypes survive the orbax hop: a diffusers export equals the source
    _assert_files_identical(src, save_pretrained(back, tmp_path / "again"))
    ours, ref = _images_both_ways(back, tmp_path / "again")
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_single_file_loads_in_diffusers(sd, tmp_path, dtype):
    source = _diffusers_folder(sd, tmp_path / "src", dtype)
    path = save_pretrained(load_pretrained(source), tmp_path / "sd.safetensors", format="single_file")
    with safe_open(path, "np") as f:
        keys = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F32" if dtype == torch.float32 else "F16"}
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys
    )
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(source), safety_checker=None, local_files_only=True, dtype=dtype
    )
    ref = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (name, k)
    assert load_pretrained(path, config=source).source.format == "single_file"
    assert_same_params(load_pretrained(path, config=source), load_pretrained(source))


def test_our_single_file_loads_alone(sd, src, tmp_path):
    """A single file of ours carries its configs in its header: it loads with no config= and no folder, and
    exported back to diffusers it is the source folder again (configs included)."""
    loaded = load_pretrained(src)
    path = save_pretrained(loaded, tmp_path / "m.safetensors", format="single_file")
    with safe_open(path, "np") as f:
        stored = json.loads(f.metadata()["jax_erasepro.configs"])
    want = json.loads((src / "unet" / "config.json").read_text())
    assert stored["unet"] == want | {"_diffusers_version": stored["unet"]["_diffusers_version"]}
    back = load_pretrained(path)
    assert_same_params(back, loaded)
    assert (back.config.unet, back.scheduler_config) == (loaded.config.unet, loaded.scheduler_config)
    assert back.tokenizer("a cat").input_ids == loaded.tokenizer("a cat").input_ids
    out = save_pretrained(back, tmp_path / "out")
    for rel in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
        assert json.loads((out / rel).read_text()) == json.loads((src / rel).read_text()), rel


def test_single_file_with_another_tokenizer_names_the_argument(sd, tmp_path):
    """The file holds no tokenizer, only its fingerprint: another tokenizer than SD v1.x's CLIP one is asked
    for by name (tokenizer=), and given, the file loads with it."""
    from jax_erasepro.errors import LoadError

    tok = sd.tokenizer.__class__.from_pretrained(str(TOKENIZER), pad_token="!")  # SD v2.x's pad token
    path = save_pretrained(sd.replace(tokenizer=tok), tmp_path / "m.safetensors", format="single_file")
    with pytest.raises(LoadError, match="tokenizer=<a folder"):
        load_pretrained(path)
    tok.save_pretrained(str(tmp_path / "tok"))
    assert load_pretrained(path, tokenizer=tmp_path / "tok").tokenizer.pad_token == "!"


def _compvis_file(source: Path, path: Path) -> Path:
    """A single file built by compvis.py's table alone (not by save_pretrained), from a diffusers folder."""
    cfg = {c: json.loads((source / c / "config.json").read_text()) for c in WEIGHTS}
    comps = {c: load_file(source / rel) for c, rel in WEIGHTS.items()}
    save_file(diffusers_to_compvis(comps, cfg), path)
    return path


def test_single_file_reads_as_its_folder(src, tmp_path):
    path = _compvis_file(src, tmp_path / "sd.safetensors")
    loaded = load_pretrained(path, config=src)
    assert_same_params(loaded, load_pretrained(src))
    # exported back to diffusers it is the source folder again (the text encoder in transformers 5 form)
    _assert_files_identical(src, save_pretrained(loaded, tmp_path / "out"))


def test_single_file_bad_input(src, tmp_path):
    path = _compvis_file(src, tmp_path / "sd.safetensors")
    tensors = load_file(path)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    save_file(dict(tensors, extra=np.zeros(2, np.float32)), tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected key 'extra'"):
        load_pretrained(tmp_path / "extra.safetensors", config=src)
    save_file(dict(tensors, **{key: np.zeros((32, 4, 1, 1), np.float32)}), tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match=f"'{key}' has shape"):
        load_pretrained(tmp_path / "shape.safetensors", config=src)
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        load_pretrained(tmp_path / "missing.safetensors", config=src)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        load_pretrained(tmp_path / "cut.safetensors", config=src)
    (tmp_path / "sd.ckpt").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="python -m convert.ckpt"):
        load_pretrained(tmp_path / "sd.ckpt")


def test_destination_rules(sd, src, tmp_path):
    loaded = load_pretrained(src)
    for bad in (src, src / "unet", src / "inner" / "x"):
        with pytest.raises(ValueError, match="source model"):
            save_pretrained(loaded, bad, overwrite=True)
    with pytest.raises(ValueError, match="source model"):  # would replace a folder holding the source
        save_pretrained(loaded, src.parent, overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(sd, out)
    with pytest.raises(safefiles.DestinationError, match="not a folder save_pretrained wrote"):
        save_pretrained(sd, out, overwrite=True)  # overwrite replaces only an output of ours
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_pretrained(sd, out)  # an empty folder is free
    save_pretrained(sd, out, overwrite=True)
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


class _FullDisk:
    """Stands in for ``open`` in safefiles: the Nth weight file written runs out of space half-way."""

    def __init__(self, fail_at: int):
        self.count, self.fail_at = 0, fail_at

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if "b" not in mode:
            return f
        self.count += 1
        if self.count < self.fail_at:
            return f
        write = f.write

        def failing(data):
            write(bytes(memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2]))
            raise OSError(28, "No space left on device")

        f.write = failing
        return f


@pytest.mark.parametrize(
    "fmt, name, fail_at",
    [("diffusers", "out", 1), ("diffusers", "out", 3), ("single_file", "out.safetensors", 1)],
)
def test_full_disk_leaves_nothing(src, tmp_path, monkeypatch, fmt, name, fail_at):
    loaded = load_pretrained(src)
    before = _tree_digest(src)
    dest = tmp_path / "dest"
    dest.mkdir()
    prior = save_pretrained(loaded, dest / name, format=fmt)  # an earlier export that overwrite would replace
    prior_digest = _tree_digest(dest)
    monkeypatch.setattr(safefiles, "open", _FullDisk(fail_at), raising=False)
    with pytest.raises(safefiles.SaveError, match="No space left on device"):
        save_pretrained(loaded, dest / ("new" + Path(name).suffix), format=fmt)
    with pytest.raises(safefiles.SaveError, match="nothing was written"):
        save_pretrained(loaded, prior, format=fmt, overwrite=True)
    assert _tree_digest(dest) == prior_digest  # the earlier export untouched, no temporary left
    assert sorted(p.name for p in dest.iterdir()) == [name]
    assert _tree_digest(src) == before


def _edit(sd, seed=0):
    """A stand-in edit: new values for one attn2.to_k weight and one bias."""
    rng = np.random.default_rng(seed)
    state = to_state_dict(sd.unet)
    bias = "down_blocks.0.attentions.0.proj_in.bias"
    new = {k: state[k] + rng.standard_normal(state[k].shape).astype(np.float32) for k in (ATTN2_K, bias)}
    return surgery.replace(sd, {f"unet.{k}": v for k, v in new.items()}), {f"unet.{k}" for k in new}


def test_delta_round_trip_and_refusals(sd, src, tmp_path):
    base = load_pretrained(src)
    edited, keys = _edit(base)
    out = save_pretrained(edited, tmp_path / "delta", format="delta", base=base, metadata={"method": "test"})
    with safe_open(out / "delta.safetensors", "np") as f:
        assert set(f.keys()) == keys
    record = json.loads((out / "delta.json").read_text())
    assert record["metadata"] == {"method": "test"} and record["base"]["path"] == str(src.resolve())
    assert_same_params(apply_delta(base, out), edited)
    # untouched tensors are what is pinned
    assert_same_params(apply_delta(base, out), apply_delta(edited, out))
    other = tiny_random_sd(seed=2)
    with pytest.raises(DeltaError, match="differs from the base"):
        apply_delta(other, out)
    with pytest.raises(ValueError, match="apply_delta"):
        load_pretrained(out)
    explicit = save_pretrained(
        edited, tmp_path / "explicit", format="delta", base=base, edited_keys=[f"unet.{ATTN2_K}"]
    )
    with safe_open(explicit / "delta.safetensors", "np") as f:
        assert set(f.keys()) == {f"unet.{ATTN2_K}"}
    with pytest.raises(ValueError, match="base="):
        save_pretrained(edited, tmp_path / "nobase", format="delta")


def test_delta_bad_files(src, tmp_path):
    base = load_pretrained(src)
    edited, _ = _edit(base)
    out = save_pretrained(edited, tmp_path / "delta", format="delta", base=base)
    file = out / "delta.safetensors"
    tensors = load_file(file)
    save_file(dict(tensors, **{"unet.nope.weight": np.zeros(2, np.float32)}), file)
    with pytest.raises(DeltaError, match="do not match delta.json"):
        apply_delta(base, out)
    key = f"unet.{ATTN2_K}"
    save_file(dict(tensors, **{key: np.zeros((3, 3), np.float32)}), file)
    with pytest.raises(DeltaError, match="has shape"):
        apply_delta(base, out)
    save_file(tensors, file)
    file.write_bytes(file.read_bytes()[:-64])
    with pytest.raises(WeightsError, match="delta.safetensors"):
        apply_delta(base, out)
    shutil.rmtree(out)
    with pytest.raises(FileNotFoundError, match="delta.json"):
        apply_delta(base, out)


def test_convert_clis(src, tmp_path):
    from convert import check_diffusers, single_file

    single_file.main(["to-single-file", str(src), str(tmp_path / "sd.safetensors")])
    tensors = load_file(tmp_path / "sd.safetensors")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, tmp_path / "sd.ckpt")
    single_file.main(["to-diffusers", str(tmp_path / "sd.ckpt"), str(tmp_path / "out"), "--config", str(src)])
    _assert_files_identical(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sd.ckpt", "sd.safetensors"]
    check_diffusers.main([str(tmp_path / "out"), "--steps", "2"])
    images = check_diffusers.check(tmp_path / "sd.safetensors", config=src)
    assert images.dtype == np.uint8 and images.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_sd14_size_single_file_and_folder(sd14_dir, tmp_path):
    """SD v1.4's real configs, random fp16 weights (about 2 GB per copy): single file and diffusers folder
    written by us, read back by us (shipped default configs) and by diffusers, every tensor equal."""
    import gc

    from flax import nnx

    from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
    from jax_erasepro.pipeline import SDConfig, StableDiffusion
    from jax_erasepro.schedulers import SchedulerConfig
    from jax_erasepro.tokenizer import load_tokenizer
    from jax_erasepro.weights import iter_state_dict, load_state_dict, state_dict_shapes

    rng = np.random.default_rng(0)
    parts = {
        "text_encoder": (CLIPTextModel, CLIPTextConfig.from_json(sd14_dir / "text_encoder" / "config.json")),
        "unet": (UNet2DConditionModel, UNet2DConditionConfig.from_json(sd14_dir / "unet" / "config.json")),
        "vae": (AutoencoderKL, AutoencoderKLConfig.from_json(sd14_dir / "vae" / "config.json")),
    }
    models = {}
    for name, (cls, cfg) in parts.items():
        abstract = nnx.eval_shape(lambda cls=cls, cfg=cfg: cls(cfg, rngs=nnx.Rngs(0)))
        shapes = state_dict_shapes(abstract)
        models[name] = load_state_dict(
            abstract,
            lambda k, shapes=shapes: (0.02 * rng.standard_normal(shapes[k], np.float32)).astype(np.float16),
            set(shapes),
            dtype=np.float16,
        )
    cfg = SDConfig(**{n: c for n, (_, c) in parts.items()}, model_index={})
    sd = StableDiffusion(
        **models,
        tokenizer=load_tokenizer(sd14_dir / "tokenizer"),
        scheduler_config=SchedulerConfig.from_json(sd14_dir / "scheduler" / "scheduler_config.json"),
        config=cfg,
    )
    single = save_pretrained(sd, tmp_path / "sd14.safetensors", format="single_file", dtype="float16")
    folder = save_pretrained(sd, tmp_path / "sd14", dtype="float16")

    def same(a, b):
        for name in ("text_encoder", "unet", "vae"):
            pairs = zip(iter_state_dict(getattr(a, name)), iter_state_dict(getattr(b, name)), strict=True)
            for (ka, va), (kb, vb) in pairs:
                assert ka == kb and va.dtype == vb.dtype and np.array_equal(va, vb), ka

    import jax_erasepro.saving as saving

    real = saving.single_file_metadata
    saving.single_file_metadata = lambda sd: {}  # a standard file: no configs of ours in its header
    try:
        plain = save_pretrained(sd, tmp_path / "plain.safetensors", format="single_file", dtype="float16")
    finally:
        saving.single_file_metadata = real
    for path in (single, folder, plain):  # our metadata, the folder, SD v1.x inferred from the shapes alone
        back = load_pretrained(path, dtype="float16")
        same(sd, back)
        del back
    plain.unlink()
    del sd, models
    gc.collect()
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), safety_checker=None, local_files_only=True, dtype=torch.float16
    )
    for name, rel in WEIGHTS.items():
        got = getattr(pipe, name).state_dict()
        with safe_open(folder / rel, "pt") as f:
            stored = f.keys()
            keys = [k for k in stored if not k.endswith("position_ids")]
            assert set(keys) == {k for k in got if not k.endswith("position_ids")}, name
            for k in keys:
                assert torch.equal(got[k], f.get_tensor(k)), (name, k)


# --- SD v2.x single files: OpenCLIP text encoder, 1024-wide context ---------------------------------------

OPEN_CLIP = "cond_stage_model.model."
SD2_UNET = dict(  # SD v2.x's layout in small: 1024 context, 64 channels per head, linear projections
    block_out_channels=(64, 128),
    layers_per_block=1,
    cross_attention_dim=1024,
    attention_head_dim=(1, 2),
    use_linear_projection=True,
    norm_num_groups=32,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_VAE = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
SD2_TEXT = dict(  # OpenCLIP's width and activation, few layers, a small vocabulary
    vocab_size=1000,
    hidden_size=1024,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def _open_clip_text(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A transformers CLIPTextModel state dict in OpenCLIP's ldm layout, written here by the mapping alone
    (independent of compvis.py), plus the entries SD does not use: text_projection, logit_scale."""
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": torch.randn(1024, 1024),
        "logit_scale": torch.tensor(4.6052),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names["self_attn.out_proj"] = "attn.out_proj"
    for i in range(SD2_TEXT["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}.attn.in_proj_{kind}"] = torch.cat(qkv)
            for hf, oc in names.items():
                out[f"{dst}.{oc}.{kind}"] = state[f"{src}.{hf}.{kind}"]
    return {OPEN_CLIP + k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """Random-weight torch SD v2.x-like modules and a standard single file of them (no metadata)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    mods = {
        "unet": UNet2DConditionModel(**SD2_UNET),
        "vae": AutoencoderKL(**SD2_VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**SD2_TEXT)),
    }
    with torch.no_grad():  # distinct values in every tensor (norms and biases too), small enough for 1e-4
        for m in mods.values():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape))
    states = {c: {k: v.detach().numpy() for k, v in m.state_dict().items()} for c, m in mods.items()}
    configs = {c: (m.config.to_dict() if c == "text_encoder" else dict(m.config)) for c, m in mods.items()}
    flat = diffusers_to_compvis(states, configs)  # UNet and VAE: the table checked against diffusers
    flat = {k: v for k, v in flat.items() if not k.startswith("cond_stage_model.")}
    flat.update(_open_clip_text(mods["text_encoder"].state_dict()))
    path = tmp_path_factory.mktemp("sd2") / "v2.safetensors"
    save_file(flat, path)
    return mods, states, path


def test_sd2_single_file_loads_alone(sd2):
    """A standard SD v2.x file with no configs: its architecture from the shapes, diffusers' v2 defaults for
    the rest (v-prediction, DDIM, 768 px; epsilon means 512 px), SD v2.x's tokenizer; weights exact and the
    text encoder's output transformers' (1e-4)."""
    from jax_erasepro.weights import to_state_dict

    mods, states, path = sd2
    sd = load_pretrained(path)
    text = sd.config.text_encoder
    assert (text.hidden_act, text.num_hidden_layers, text.num_attention_heads) == ("gelu", 2, 16)
    assert (text.vocab_size, text.intermediate_size) == (1000, 64)
    assert list(sd.config.unet.attention_head_dim) == [1, 2] and sd.config.unet.use_linear_projection
    assert (sd.config.unet.sample_size, sd.scheduler_config.prediction_type) == (96, "v_prediction")
    assert sd.scheduler_config.class_name == "DDIMScheduler" and sd.tokenizer.pad_token == "!"
    for c in ("unet", "vae"):
        got = to_state_dict(getattr(sd, c))
        assert got.keys() == states[c].keys()
        for k, v in states[c].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{c}.{k}")
    ids = np.random.default_rng(0).integers(0, 1000, (2, 77))
    with torch.no_grad():
        ref = mods["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(sd.text_encoder(ids)), ref, atol=1e-4, rtol=0)
    base = load_pretrained(path, prediction_type="epsilon")
    assert (base.config.unet.sample_size, base.scheduler_config.prediction_type) == (64, "epsilon")


def test_sd2_single_file_round_trip_and_diffusers(sd2, tmp_path):
    """Ours -> file -> ours is bit-identical (configs and SD v2.x tokenizer from the metadata); the file
    holds OpenCLIP's layout (the model's blocks only) and diffusers' from_single_file reads it, as it reads
    the standard file, to the source weights."""
    mods, states, path = sd2
    sd = load_pretrained(path)
    out = save_pretrained(sd, tmp_path / "ours.safetensors", format="single_file")
    with safe_open(out, "np") as f:
        text_keys = {k for k in f.keys() if k.startswith("cond_stage_model.")}  # noqa: SIM118
    blocks = {k.split(".")[4] for k in text_keys if ".resblocks." in k}
    assert all(k.startswith(OPEN_CLIP) for k in text_keys) and blocks == {"0", "1"}
    back = load_pretrained(out)
    assert_same_params(back, sd)
    for c in ("text_encoder", "unet", "vae"):
        assert getattr(back.config, c) == getattr(sd.config, c), c
    assert back.scheduler_config == sd.scheduler_config
    assert back.tokenizer.pad_token == "!"
    folder = save_pretrained(sd, tmp_path / "folder")  # the configs diffusers needs, offline
    for file in (out, path):
        pipe = StableDiffusionPipeline.from_single_file(
            str(file), config=str(folder), local_files_only=True, safety_checker=None
        )
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        for c in ("unet", "vae", "text_encoder"):
            got = {k.removeprefix("text_model."): v for k, v in getattr(pipe, c).state_dict().items()}
            got.pop("embeddings.position_ids", None)
            assert got.keys() == states[c].keys(), c
            for k, v in states[c].items():
                np.testing.assert_array_equal(got[k].numpy(), v, err_msg=f"{file.name}: {c}.{k}")
