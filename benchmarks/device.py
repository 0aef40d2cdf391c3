"""One run of every benchmark on whatever accelerator is here (a GPU machine): JSON per card.

    python benchmarks/device.py [--out FILE] [--configs DIR] [--quick] [--stages pipeline erase ...]

Stages (each records its seconds, its numbers, or its error; a failing stage never stops the others):

* ``pipeline``: SD v1.4's configs with random weights, 64x64 latents, batch 4, 50 steps: the text encoder,
  one U-Net step, the VAE decode and a guided generation, JAX (``benchmarks/pipeline.py``'s ``run_jax``)
  against diffusers PyTorch (its ``run_torch``, on the GPU when torch sees one), plus a JAX ``generate`` of
  4 prompts.
* ``erase``: ErasePro (default form) and UCE at 1, 100 and 1,000 concepts (``benchmarks/erase.py``'s
  ``run``, one round per size; UCE with its PyTorch reference, which that script runs on the CPU).
* ``finetune``: one iteration of every fine-tuning method in ``jax_erasepro.erase.REGISTRY`` (3 steps;
  ``first_step`` is compile plus one step, ``per_step`` the time per step after it).
* ``evaluate``: ErasePro on shapes-sd ("zorbly" -> "star") and a small ``evaluate`` of it.

The JSON (default ``benchmarks/results/gpu/<card>.json``) is rewritten after every part, and a stage is
marked as unfinished before it starts, so a run killed by a timeout keeps what it measured and says where
it stopped. ``--quick``: tiny configs (text width 768, so the PyTorch references take them), 8x8 latents,
2 steps, 1/2/3 concepts, what tests/test_benchmarks_device.py runs on a CPU. ``benchmarks/device.sh`` runs
each stage in its own process under a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the GPU

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # jax_erasepro without pip install; pipeline/erase
STAGES = ("pipeline", "erase", "finetune", "evaluate")
UNFINISHED = "started, did not finish (killed by its time limit or crashed; see the run's log)"
CONFIG_FILES = (
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)


def check_imports() -> dict[str, str]:
    """'ok' or the error, per package the stages use."""
    out = {}
    for name in ("jax", "flax", "jax_erasepro", "torch", "diffusers", "transformers"):
        try:
            __import__(name)
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure to import is a missing package here
            out[name] = f"{type(e).__name__}: {e}"
    return out


def card_name() -> str:
    """The accelerator's name as JAX reports it, or nvidia-smi's, or "cpu"."""
    try:
        import jax

        dev = jax.devices()[0]
        if dev.platform != "cpu":
            return dev.device_kind
    except Exception:  # noqa: BLE001
        pass
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def quick_dicts() -> dict[str, dict]:
    """The tests' tiny configs with the text width (and U-Net context) at 768, as the benchmarks assume."""
    from jax_erasepro.tiny import SD_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE

    text = {**TINY_TEXT, "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 1}
    text.update(model_type="clip_text_model", architectures=["CLIPTextModel"])
    unet = {**TINY_UNET, "cross_attention_dim": 768, "_class_name": "UNet2DConditionModel"}
    unet.update(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"])
    unet.update(up_block_types=["CrossAttnUpBlock2D"])
    vae = {**TINY_VAE, "_class_name": "AutoencoderKL", "block_out_channels": [16]}
    vae.update(down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    sched = {**SD_SCHEDULER, "_class_name": "PNDMScheduler"}
    return {CONFIG_FILES[0]: text, CONFIG_FILES[1]: unet, CONFIG_FILES[2]: vae, CONFIG_FILES[3]: sched}


def config_candidates(given: str | None) -> list[Path]:
    found = [given, os.environ.get("SD14_CONFIGS"), ROOT / "shared" / "sd-v1-4", "/work/shared/sd-v1-4"]
    found += [ROOT / "tests" / "data" / "sd-v1-4", ROOT / "jax_erasepro" / "assets" / "sd-v1-4-configs"]
    return [Path(p) for p in found if p]


def materialize_configs(given: str | None, quick: bool, into: Path) -> str:
    """A complete diffusers-layout config folder (configs + tokenizer) in ``into``; returns its source."""
    from jax_erasepro.tiny import clip_tokenizer_path

    source = "tiny dicts (jax_erasepro.tiny, text width 768)"
    if quick:
        for rel, cfg in quick_dicts().items():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            (into / rel).write_text(json.dumps(cfg))
    else:
        src = next(
            (p for p in config_candidates(given) if all((p / f).is_file() for f in CONFIG_FILES)), None
        )
        if src is None:
            raise FileNotFoundError(f"no SD v1.4 config folder among {config_candidates(given)}")
        for rel in CONFIG_FILES:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, into / rel)
        source = str(src)
    tok = (
        Path(given or "") / "tokenizer"
        if given and (Path(given) / "tokenizer" / "vocab.json").is_file()
        else None
    )
    shutil.copytree(tok or clip_tokenizer_path(), into / "tokenizer", dirs_exist_ok=True)
    return source


def build_sd(configs: Path):
    """Random weights in the folder's configs (the same build as benchmarks/pipeline.py's)."""
    from flax import nnx

    from jax_erasepro import schedulers
    from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
    from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
    from jax_erasepro.pipeline import SDConfig, StableDiffusion
    from jax_erasepro.tokenizer import load_tokenizer

    rngs = nnx.Rngs(0)
    text = CLIPTextConfig.from_json(configs / CONFIG_FILES[0])
    unet = UNet2DConditionConfig.from_json(configs / CONFIG_FILES[1])
    vae = AutoencoderKLConfig.from_json(configs / CONFIG_FILES[2])
    return StableDiffusion(
        text_encoder=CLIPTextModel(text, rngs=rngs),
        unet=UNet2DConditionModel(unet, rngs=rngs),
        vae=AutoencoderKL(vae, rngs=rngs),
        tokenizer=load_tokenizer(configs / "tokenizer"),
        scheduler_config=schedulers.SchedulerConfig.from_json(configs / CONFIG_FILES[3]),
        config=SDConfig(text_encoder=text, unet=unet, vae=vae, model_index={}),
    )


class Recorder:
    """The results file: loaded if there, rewritten after every part."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.update(header)
        self.data.setdefault("stages", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def part(self, stage: str, name: str, fn) -> None:
        """Run one part of a stage; its result (a dict) or its error goes under stages[stage][name]."""
        t0 = time.perf_counter()
        try:
            res = {"seconds": 0.0, **fn()}
        except Exception as e:  # noqa: BLE001 - a failing part is recorded and the run goes on
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = time.perf_counter() - t0
        self.data["stages"][stage].setdefault("parts", {})[name] = res
        print(f"[device] {stage}/{name}: {json.dumps(res, default=str)[:400]}", flush=True)
        self.save()


def stage_pipeline(rec: Recorder, cfg: argparse.Namespace) -> None:
    import pipeline as bench  # benchmarks/pipeline.py

    # pipeline.py's batch stays 2: its components run at batch 2, its generation at one guided prompt
    bench.SD14, bench.LATENT = cfg.configs, cfg.latent
    stage = rec.data["stages"]["pipeline"]
    stage["config"] = {
        "component_batch": bench.BATCH,
        "generate_batch": 4,
        "latent": cfg.latent,
        "steps": cfg.steps,
    }
    rec.part("pipeline", "jax", lambda: bench.run_jax(cfg.steps, cfg.repeats))

    def torch_side() -> dict:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_default_device(device)
        try:
            out = bench.run_torch(cfg.steps, cfg.repeats)
            if device == "cuda":
                torch.cuda.synchronize()
        finally:
            torch.set_default_device("cpu")
        return {"device": device, **out}

    rec.part("pipeline", "torch", torch_side)

    def generate_batch4() -> dict:
        import jax

        from jax_erasepro.pipeline import generate

        sd = build_sd(cfg.configs)
        size = cfg.latent * 2 ** (len(sd.config.vae.block_out_channels) - 1)
        kw = {"num_inference_steps": cfg.steps, "height": size, "width": size}
        t0 = time.perf_counter()
        jax.block_until_ready(generate(sd, ["a photo of a cat"] * 4, **kw))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(generate(sd, ["a photo of a dog"] * 4, seed=1, **kw))
        return {"first_call_s": first, "generate_s": time.perf_counter() - t0, "images": 4, "size": size}

    rec.part("pipeline", "jax_generate_batch4", generate_batch4)


ERASE = {"rounds": 1, "methods": ("erasepro", "uce")}  # the default form, and UCE against its torch reference


def stage_erase(rec: Recorder, cfg: argparse.Namespace) -> None:
    import erase as bench  # benchmarks/erase.py (imports torch for its reference)

    bench.CONFIGS = cfg.configs
    rec.data["stages"]["erase"]["torch_device"] = "cpu (benchmarks/erase.py's reference)"
    for n in cfg.concepts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "erase.json"
            rec.part("erase", f"concepts_{n}", lambda n=n, out=out: bench.run([n], out, **ERASE))


def stage_finetune(rec: Recorder, cfg: argparse.Namespace) -> None:
    import numpy as np

    from jax_erasepro.erase import REGISTRY, erase
    from jax_erasepro.erase.finetune import LoopOptions

    sd = build_sd(cfg.configs)
    extra = {
        "ac": {"anchor_images": 4, "generation_steps": 2},
        "fewshot": {"images": np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)},
    }
    methods = [name for name, m in REGISTRY.items() if issubclass(m.options, LoopOptions)]
    methods = [m for m in methods if cfg.methods is None or m in cfg.methods]
    rec.data["stages"]["finetune"]["methods"] = methods
    for m in methods:

        def one(m=m) -> dict:
            _, report = erase(sd, "cat", "dog", method=m, steps=3, progress=False, **extra.get(m, {}))
            t = report.timings
            return {"first_step_s": t["first_step"], "per_step_s": t["per_step"], "total_s": t["total"]}

        rec.part("finetune", m, one)


def stage_evaluate(rec: Recorder, cfg: argparse.Namespace) -> None:
    import jax_erasepro as jep
    from jax_erasepro.evaluation import evaluate

    state = {}

    def load() -> dict:
        state["sd"] = jep.load_pretrained()
        state["erased"], report = jep.erase(state["sd"], "zorbly", "star")
        return {"erase_s": report.timings["total"]}

    def run() -> dict:
        steps = 2 if cfg.quick else 20
        ev = evaluate(
            state["sd"],
            state["erased"],
            ["zorbly"],
            ["star"],
            images_per_prompt=1,
            num_inference_steps=steps,
            reference=False,
            robustness=False,
            cache=False,
        )
        rate = ev.to_dict()["target_rate"]
        return {"steps": steps, "target_rate_before": rate["before"], "target_rate_after": rate["after"]}

    rec.part("evaluate", "load_and_erase", load)
    if "sd" in state:
        rec.part("evaluate", "evaluate", run)


RUNNERS = {
    "pipeline": stage_pipeline,
    "erase": stage_erase,
    "finetune": stage_finetune,
    "evaluate": stage_evaluate,
}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/gpu/<card>.json)")
    p.add_argument(
        "--configs", help="SD v1.4 config folder (default $SD14_CONFIGS, shared/, tests/data, assets)"
    )
    p.add_argument("--quick", action="store_true", help="tiny configs, 2 steps, 1/2/3 concepts (the test)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--methods", nargs="+", help="fine-tuning methods of the finetune stage (default: all)")
    args = p.parse_args(argv)
    imports = check_imports()
    missing = {k: v for k, v in imports.items() if v != "ok"}
    if missing:
        print("[device] missing or broken:", "; ".join(f"{k} ({v})" for k, v in missing.items()), flush=True)
    card = card_name()
    out = args.out or ROOT / "benchmarks" / "results" / "gpu" / f"{slug(card)}.json"
    header = {"card": card, "quick": args.quick, "imports": imports, "python": platform.python_version()}
    try:
        import jax

        header.update(jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()])
        header["device_kind"] = jax.devices()[0].device_kind
    except Exception as e:  # noqa: BLE001
        header["jax_devices"] = f"{type(e).__name__}: {e}"
    rec = Recorder(out, header)
    cfg = argparse.Namespace(
        quick=args.quick,
        latent=8 if args.quick else 64,
        steps=2 if args.quick else 50,
        repeats=1 if args.quick else 3,
        concepts=[1, 2, 3] if args.quick else [1, 100, 1000],
        methods=args.methods,
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg.configs = Path(tmp)
        made = False
        for stage in args.stages:
            t0 = time.perf_counter()
            rec.data["stages"][stage] = {"error": UNFINISHED, "seconds": 0.0}
            rec.save()
            try:
                if not made:
                    rec.data["config_source"] = materialize_configs(args.configs, args.quick, cfg.configs)
                    made = True
                RUNNERS[stage](rec, cfg)
                rec.data["stages"][stage].pop("error")
                failed = [k for k, v in rec.data["stages"][stage].get("parts", {}).items() if "error" in v]
                if failed:
                    rec.data["stages"][stage]["failed_parts"] = failed
            except Exception as e:  # noqa: BLE001 - a failing stage is recorded and the run goes on
                traceback.print_exc()
                rec.data["stages"][stage]["error"] = f"{type(e).__name__}: {e}"
            rec.data["stages"][stage]["seconds"] = time.perf_counter() - t0
            rec.save()
            print(f"[device] stage {stage}: {rec.data['stages'][stage]['seconds']:.1f} s", flush=True)
    print(f"[device] wrote {out}")
    return out


if __name__ == "__main__":
    main()
