"""The ``jax-erasepro`` command line: ``erase``, ``evaluate``, ``generate`` and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jax_erasepro.pipeline import StableDiffusion
from jax_erasepro.schedulers import KINDS


def load_model(path: str | None) -> StableDiffusion:
    """The model at ``path``; else the embedded default, or a tiny random model while none is shipped."""
    from jax_erasepro.loading import load_pretrained

    if path is not None:
        return load_pretrained(path)
    try:
        return load_pretrained()
    except FileNotFoundError:
        from jax_erasepro.tiny import tiny_random_sd

        print("note: no embedded model installed; using a tiny random model", file=sys.stderr)
        return tiny_random_sd()


def cmd_generate(args: argparse.Namespace) -> None:
    from jax_erasepro.images import save_grid
    from jax_erasepro.pipeline import generate

    sd = load_model(args.model)
    images = generate(
        sd,
        args.prompt,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
    )
    out = save_grid(images, Path(args.out), nrow=len(args.prompt), scale=args.scale)
    print(f"wrote {out} ({len(images)} images)")


def _concepts(value: object, what: str, source: str) -> list[str]:
    """A YAML value as concepts: one string is one concept (not its letters), else a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{source}: {what} must be a string or a list of strings, got {value!r}")


def _is_pair(pair: object) -> bool:
    """A YAML pair: a mapping with a string ``target`` and optionally a string ``anchor``, nothing else."""
    if not isinstance(pair, dict) or "target" not in pair or not set(pair) <= {"target", "anchor"}:
        return False
    return all(isinstance(v, str) for v in pair.values())


def _read_config(path: str) -> tuple[list[str], list[str], list[str], dict]:
    """Targets, anchors, preserved concepts and other options of a YAML file, each type checked."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        raise ValueError(f"{path}: expected a mapping of options (pairs, preserve, method, ...), got {cfg!r}")
    pairs = cfg.pop("pairs", [])
    if not isinstance(pairs, list):
        raise ValueError(f"{path}: pairs must be a list of {{target, anchor}} mappings, got {pairs!r}")
    targets, anchors = [], []
    for i, pair in enumerate(pairs):
        if not _is_pair(pair):
            raise ValueError(f"{path}: pairs[{i}] must be {{target: str, anchor: str}}, got {pair!r}")
        targets.append(pair["target"])
        anchors.append(pair.get("anchor", ""))
    return targets, anchors, _concepts(cfg.pop("preserve", []), "preserve", path), cfg


def _read_pairs(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], dict]:
    """Targets, anchors and preserved concepts from flags or a YAML file (``pairs: [{target, anchor}]``)."""
    targets, anchors, preserve = list(args.target or []), list(args.anchor or []), list(args.preserve or [])
    extra: dict = {}
    if args.config:
        more_targets, more_anchors, more_preserve, extra = _read_config(args.config)
        targets, anchors, preserve = targets + more_targets, anchors + more_anchors, preserve + more_preserve
    if len(anchors) == 1 and len(targets) > 1:
        anchors *= len(targets)
    if not targets:
        raise ValueError("no target concept: give --target or a --config with pairs")
    if len(anchors) != len(targets):
        raise ValueError(f"{len(targets)} targets but {len(anchors)} anchors")
    return targets, anchors, preserve, extra


def cmd_erase(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from jax_erasepro import safefiles
    from jax_erasepro.erase import erase
    from jax_erasepro.images import save_grid
    from jax_erasepro.pipeline import generate
    from jax_erasepro.saving import save_pretrained

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder exists and is not empty: {out}")
    targets, anchors, preserve, extra = _read_pairs(args)
    method = extra.pop("method", args.method)
    prompts = extra.pop("prompts", None)
    with tqdm(total=5, desc="erase", unit="stage") as steps:  # closed before any error is printed
        sd = load_model(args.model)
        steps.update()
        # the erasure first: it checks its input, so a bad one fails before any sampling
        erased, report = erase(
            sd, targets, anchors, method=method, preserve=preserve, prompts=prompts, **extra
        )
        steps.update()
        shown = targets[:4] + preserve[:2]
        grid_prompts = [p for c in shown for p in (f"a picture of {c}", f"{c}")][: 2 * len(shown)]
        grid_prompts += _unrelated(targets, args.model is None)
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        before = generate(sd, grid_prompts, **kw)
        steps.update()
        after = generate(erased, grid_prompts, **kw)
        steps.update()
        evaluation = _quick_evaluation(args, sd, erased, targets, anchors)
        try:  # a unique temporary, put in place only if ``out`` is still free: of two runs, one wins
            with safefiles.atomic_output(out, is_dir=True) as tmp:
                save_pretrained(erased, tmp / "model")
                report.to_json(tmp / "report.json")
                report.plot(tmp / "report.png")
                pairs = np.stack([before, after], axis=1).reshape(-1, *before.shape[1:])
                save_grid(pairs, tmp / "before_after.png", nrow=2, scale=args.scale, row_labels=grid_prompts,
                          column_labels=["before", "after"])
                if evaluation is not None:
                    evaluation.save(tmp / "evaluation")
        except safefiles.DestinationExists:
            msg = f"{out} was written by another run meanwhile; this run's results were discarded"
            raise ValueError(msg) from None
        except safefiles.SaveError as e:
            raise ValueError(str(e)) from None
        steps.update()
    extra = ", evaluation/" if evaluation is not None else ""
    print(f"wrote {out}/: model/, report.json, report.png, before_after.png (before | after){extra}")
    if evaluation is not None:
        _print_rates(evaluation)


def _unrelated(targets: list[str], world: bool) -> list[str]:
    """Two prompts that name no target, for the before/after grid (what must not change)."""
    from jax_erasepro.evaluation.prompts import GENERIC_OTHERS, world_others

    pool = world_others(targets, []) if world else list(GENERIC_OTHERS)
    pool = [p for p in pool if not any(t.lower() in p.lower() for t in targets)]
    return pool[:: max(1, len(pool) // 3)][:3]


def _quick_evaluation(args: argparse.Namespace, sd, erased, targets, anchors):
    """A few images per set (about a minute on shapes-sd): target rate and others' accuracy, before/after."""
    from jax_erasepro.evaluation import evaluate

    if not args.eval:
        return None
    if args.model is not None and args.judge is None:
        print("note: no quick evaluation (--judge <CLIP folder> evaluates this model)", file=sys.stderr)
        return None
    prompts = None if args.judge is None else ["{}", "a photo of {}", "a painting of {}"]
    return evaluate(sd, erased, targets, anchors, judge=args.judge, prompts=prompts, images_per_prompt=1,
                    num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                    robustness=False, reference=False)


def _print_rates(evaluation) -> None:
    """The headline numbers, and a warning when the rest of the model moved."""
    s = evaluation.summary
    for name in ("target_rate", "anchor_rate", "others_accuracy"):
        if e := s.get(name):
            print(f"{name.replace('_', ' '):>16}: {e['before']:.2f} -> {e['after']:.2f}  "
                  f"(95% CI of the drop {e['drop_ci'][0]:+.2f} .. {e['drop_ci'][1]:+.2f}, {e['n']} images)")
    o = s["clip_score"]["O"]
    print(f"{'CLIP score O':>16}: {o['value']:.3f} (1 = other prompts draw the same images as before)")
    others = s.get("others_accuracy")
    if others and others["drop"] > 0.10:
        print(f"warning: others' accuracy dropped by {others['drop']:.0%}: the erasure changed unrelated "
              "prompts (see evaluation/grid_others.png)", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from jax_erasepro.evaluation import evaluate
    from jax_erasepro.evaluation.prompts import EvaluationError

    folder = Path(args.erased)
    model_dir = folder / "model" if (folder / "model" / "model_index.json").is_file() else folder
    targets, anchors = list(args.target or []), list(args.anchor or [])
    if not targets:
        report = folder / "report.json"
        if not report.is_file():
            raise EvaluationError(f"no --target given and no erase report at {report}")
        try:
            data = json.loads(report.read_text())
            targets, anchors = list(data["targets"]), list(data["anchors"])
        except (ValueError, KeyError, TypeError) as e:
            raise EvaluationError(f"{report}: not an erase report ({e})") from None
    out = Path(args.out) if args.out else folder / "evaluation"
    if args.images < 1 or args.steps < 1:
        raise EvaluationError("--images and --steps must be >= 1")
    original, erased = load_model(args.original), load_model(str(model_dir))
    quick = args.quick
    evaluation = evaluate(
        original, erased, targets, anchors or [""], judge=args.judge, prompts=args.prompts,
        images_per_prompt=1 if quick else args.images, num_inference_steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, robustness=not quick, reference=not quick,
    )
    evaluation.save(out)
    print(evaluation.to_markdown())
    _print_rates(evaluation)
    print(f"wrote {out}/: evaluation.json, evaluation.md, grid_*.png")


def cmd_report(args: argparse.Namespace) -> None:
    path = Path(args.path)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}")
    data = json.loads(path.read_text())
    print(f"method: {data.get('method')}  targets: {data.get('targets')}  anchors: {data.get('anchors')}")
    print(f"{'edited weight':72} {'residual before':>15} {'after':>10} {'rel change':>10}")
    for layer in data.get("layers", []):
        print(
            f"{layer['key']:72} {layer['residual_before']:15.3e} {layer['residual_after']:10.3e}"
            f" {layer['relative_change']:10.3e}"
        )
    for note in data.get("notes", []):
        print(f"note: {note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-erasepro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image sampling to a PNG grid")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    gen.add_argument("--out", default="out/generate.png")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--scheduler", choices=KINDS, help="sampler (default: the model's own scheduler)")
    gen.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG")
    gen.set_defaults(func=cmd_generate)

    er = sub.add_parser("erase", help="erase concepts; writes the model, report and before/after grid")
    er.add_argument("--target", action="append", help="concept to erase (repeat for several)")
    er.add_argument("--anchor", action="append", help="what each target becomes (one for all, or one each)")
    er.add_argument("--preserve", action="append", help="concept to keep exactly where it was (repeatable)")
    er.add_argument("--method", default="erasepro", help="erasepro, erasepro-implicit, uce")
    er.add_argument("--config", help="YAML: pairs [{target, anchor}], preserve, method, prompts, options")
    er.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    er.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--steps", type=int, default=50)
    er.add_argument("--guidance", type=float, default=7.5)
    er.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG grid")
    er.add_argument("--no-eval", dest="eval", action="store_false",
                    help="skip the quick evaluation (one image per prompt of each set)")
    er.add_argument("--judge", help="a CLIP folder for the quick evaluation (default: shapes-clip)")
    er.set_defaults(func=cmd_erase)

    ev = sub.add_parser("evaluate", help="judge an erasure on generated images, before and after")
    ev.add_argument("--erased", required=True, help="an erase output folder (model/, report.json) or a model")
    ev.add_argument("--original", default=None, help="the model before erasure (default: the embedded model)")
    ev.add_argument("--target", action="append", help="erased concept (default: from report.json)")
    ev.add_argument("--anchor", action="append", help="its anchor (default: from report.json)")
    ev.add_argument("--judge", help="a transformers CLIPModel folder (default: shapes-clip)")
    ev.add_argument("--prompts", help="YAML of prompt sets: target (templates with {}), others, robust")
    ev.add_argument("--images", type=int, default=4, help="images per prompt (default: %(default)s)")
    ev.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    ev.add_argument("--guidance", type=float, default=7.5)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--quick", action="store_true", help="one image per prompt, no robustness or reference")
    ev.add_argument("--out", help="output folder (default: <erased>/evaluation)")
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="print an erasure report (a report.json or the folder holding it)")
    rep.add_argument("path")
    rep.set_defaults(func=cmd_report)
    return parser


def run() -> int:
    """The console script: ``main`` with compiled programs cached on disk between runs (see compile_cache)."""
    from jax_erasepro.compile_cache import use_compilation_cache

    use_compilation_cache()
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
