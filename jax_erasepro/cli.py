"""The ``jax-erasepro`` command line: ``erase``, ``evaluate``, ``generate``, ``report`` and ``methods``.

Every argument is checked before a model loads. A bad argument or any library error is one line
``error: ...`` and exit code 2; ``jax-erasepro --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from jax_erasepro.erase.methods import REGISTRY, get_method, parse_assignment
from jax_erasepro.errors import ConfigError, EraseError, EraseProError, LoadError
from jax_erasepro.saving import FORMATS
from jax_erasepro.schedulers import KINDS
from jax_erasepro.sd import StableDiffusion

DEFAULT_METHOD = "erasepro"
IMPLICIT_METHODS = ("erasepro-implicit",)  # their anchor is "" (erase towards nothing) unless one is given
CONFIG_KEYS = ("pairs", "preserve", "method", "prompts", "options")
MANY_TARGETS = 100  # above this, erase prints what to expect before it starts
# One measurement, scaled linearly: 2,000 concepts in one call took 274 s and 7.4 GB peak (2-core CPU).
SECONDS_PER_TARGET, GB_PER_TARGET = 274 / 2000, 7.4 / 2000

ERASE_EPILOG = """\
config file (--config, YAML; see examples/erase_config.yaml):
  pairs:                       # targets and what each becomes (anchor "" or left out: towards nothing)
    - {target: zorbly, anchor: star}
  preserve: [quibbet]          # one string or a list
  method: erasepro             # jax-erasepro methods lists them
  prompts: ["{}", "a picture of {}"]
  options: {form: protected, ridge: 1e-2}   # the method's options: jax-erasepro methods NAME
Command-line flags win over the file: --method, --template and each --option replace the file's value;
--target/--anchor/--preserve add to its pairs and preserve. Other top-level keys are refused.
"""


class UsageError(EraseProError, ValueError):
    """A command-line argument that cannot be used; the message names it."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one UsageError line (printed by ``main``) instead of usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every argument's default in its help (unless None, a switch, or the help already says it); epilogs
    kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --- argument types: checked while parsing, so a bad value never reaches a model -------------------------


def _count(text: str) -> int:
    """An integer >= 1 (steps, images, scale)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _guidance(text: str) -> float:
    """A finite guidance scale >= 0 (diffusers' rule: classifier-free guidance is on above 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


# --- paths: each refused with the flag named before anything is loaded or written -----------------------


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path, flag: str) -> None:
    """UsageError unless ``path`` can be created: its nearest existing ancestor is a folder we can write in
    (tried by creating and removing a hidden folder there, which also holds for root and read-only mounts)."""
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".jax-erasepro-check-").cleanup()
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


def _check_model_path(path: str | None, flag: str) -> None:
    """UsageError for a model path that does not exist or is a file of another kind."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file or folder")
    if p.is_file() and p.suffix != ".safetensors":
        raise UsageError(f"{flag} {path}: expected a model folder or a single-file .safetensors")


def _check_exists(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such file or folder")


def _source_model(path: str | None) -> Path | None:
    """The folder or file the model will be read from (the embedded one when ``path`` is None)."""
    if path is not None:
        return Path(path)
    from jax_erasepro.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        return None


def _check_out_folder(out: Path, model: str | None) -> None:
    """An erase ``--out``: a new or empty folder, not inside (nor holding) the source model, writable."""
    if out.is_file():
        raise UsageError(f"--out {out}: is a file (give a new or empty folder)")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder exists and is not empty (give a new or empty folder)")
    source = _source_model(model)
    if source is not None:
        dest, src = out.resolve(), source.resolve()
        if dest == src or src in dest.parents or dest in src.parents:
            raise UsageError(f"--out {out}: lies inside the source model {source} (write elsewhere)")
    _check_writable(out, "--out")


def _check_png_out(text: str) -> Path:
    """A ``generate --out``: a .png file (not a folder) in a writable place."""
    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        raise UsageError(f"--out {text}: is a folder (give a .png file, e.g. {out / 'generate.png'})")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {text}: expected a .png file")
    _check_writable(out, "--out")
    return out


# --- models ----------------------------------------------------------------------------------------------


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


# --- generate --------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from jax_erasepro.images import save_grid
    from jax_erasepro.pipeline import generate

    out = _check_png_out(args.out)
    _check_model_path(args.model, "--model")
    sd = load_model(args.model)
    rows = []
    for prompt in tqdm(args.prompt, desc="generate", unit="prompt"):  # the first includes compiling
        rows.append(
            generate(sd, [prompt] * args.images, seed=args.seed, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, scheduler=args.scheduler)
        )
    images = np.concatenate(rows)
    columns = [f"#{i + 1}" for i in range(args.images)] if args.images > 1 else None
    path = save_grid(images, out, nrow=args.images, scale=args.scale, row_labels=args.prompt,
                     column_labels=columns)
    print(f"wrote {path.resolve()} ({len(images)} images: {len(args.prompt)} prompts x {args.images})")


# --- erase -----------------------------------------------------------------------------------------------


def _strings(value: object, what: str, source: str) -> list[str]:
    """A YAML value as strings: one string is one item (not its letters), else a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{source}: {what} must be a string or a list of strings, got {value!r}")


def _is_pair(pair: object) -> bool:
    """A YAML pair: a mapping with a string ``target`` and optionally a string ``anchor``, nothing else."""
    if not isinstance(pair, dict) or "target" not in pair or not set(pair) <= {"target", "anchor"}:
        return False
    return all(isinstance(v, str) for v in pair.values())


def _option_names() -> set[str]:
    return {row["name"] for method in REGISTRY.values() for row in method.describe()}


def read_config(path: str) -> dict[str, Any]:
    """An erase config (YAML, the layout in ``ERASE_EPILOG``) as targets, anchors, preserve, method, prompts
    and options, each type checked; ConfigError naming the file and key otherwise."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(CONFIG_KEYS)}, got {cfg!r}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        hint = f"the top-level keys are {', '.join(CONFIG_KEYS)}"
        if set(unknown) & _option_names():
            hint = f"method options go under options: (e.g. options: {{{unknown[0]}: ...}}); {hint}"
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}: {hint}")
    pairs = [] if cfg.get("pairs") is None else cfg["pairs"]
    if not isinstance(pairs, list):
        raise ConfigError(f"{path}: pairs must be a list of {{target, anchor}} mappings, got {pairs!r}")
    for i, pair in enumerate(pairs):
        if not _is_pair(pair):
            raise ConfigError(f"{path}: pairs[{i}] must be {{target: str, anchor: str}}, got {pair!r}")
    method = cfg.get("method")
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"{path}: method must be a string, got {method!r}")
    prompts = cfg.get("prompts")
    if prompts is not None and not (prompts := _strings(prompts, "prompts", path)):
        raise ConfigError(f"{path}: prompts is empty (leave it out for the method's default templates)")
    options = {} if cfg.get("options") is None else cfg["options"]
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"{path}: options must be a mapping (option name: value), got {options!r}")
    preserve = [] if cfg.get("preserve") is None else _strings(cfg["preserve"], "preserve", path)
    return {
        "targets": [p["target"] for p in pairs],
        "anchors": [p.get("anchor", "") for p in pairs],
        "preserve": preserve,
        "method": method,
        "prompts": prompts,
        "options": options,
    }


def _flag_pairs(args: argparse.Namespace, method: str) -> tuple[list[str], list[str]]:
    """Targets and anchors of ``--target``/``--anchor``: one anchor for all, one per target, or (implicit
    methods) none, meaning ""."""
    targets, anchors = list(args.target or []), list(args.anchor or [])
    if anchors and not targets:
        raise UsageError("--anchor without --target (a config's pairs carry their own anchors)")
    if targets and not anchors and method in IMPLICIT_METHODS:
        print(f'note: no --anchor: {method} erases towards nothing (anchor ""); give --anchor to choose one',
              file=sys.stderr)
        anchors = [""]
    if len(anchors) == 1:
        anchors *= len(targets)
    if len(anchors) != len(targets):
        n, m = len(targets), len(anchors)
        raise UsageError(
            f"{n} target{'s' * (n != 1)} but {m} anchor{'s' * (m != 1)}: give one --anchor for all, one per "
            "target, or --anchor '' to erase towards nothing"
        )
    return targets, anchors


def erase_request(args: argparse.Namespace) -> dict[str, Any]:
    """The erase arguments (flags over ``--config``) as keyword arguments of ``erase()``, every one checked:
    method, options (typed by the method's declaration), concepts, templates. Loads no model."""
    cfg = read_config(args.config) if args.config else {}
    method = args.method or cfg.get("method") or DEFAULT_METHOD
    try:  # only a config can name an unknown method (argparse checks --method) or hold a bad option
        spec = get_method(method)
        spec.make_options(cfg.get("options"))
    except EraseError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    given = {**cfg.get("options", {}), **dict(parse_assignment(text) for text in args.option or [])}
    typed = spec.make_options(given)
    options = {name: getattr(typed, name) for name in given}  # "1e-2" from text is 0.01 here
    if not (args.target or cfg.get("targets")):
        raise UsageError("no target concept: give --target or a --config with pairs")
    targets, anchors = _flag_pairs(args, method)
    targets, anchors = targets + cfg.get("targets", []), anchors + cfg.get("anchors", [])
    for target, anchor in zip(targets, anchors, strict=True):
        if not target.strip():
            raise UsageError("an empty target concept: every --target must name something")
        if target.strip().lower() == anchor.strip().lower():  # CLIP's tokenizer lowercases
            raise UsageError(f"target {target!r} equals its anchor {anchor!r}: nothing to erase")
    return {
        "targets": targets,
        "anchors": anchors,
        "preserve": list(args.preserve or []) + cfg.get("preserve", []),
        "method": method,
        "prompts": args.template or cfg.get("prompts"),
        "options": options,
    }


def cmd_erase(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from jax_erasepro import safefiles
    from jax_erasepro.erase import erase
    from jax_erasepro.images import save_grid
    from jax_erasepro.pipeline import generate
    from jax_erasepro.saving import save_pretrained

    request = erase_request(args)
    out = Path(args.out)
    _check_out_folder(out, args.model)
    _check_model_path(args.model, "--model")
    _check_exists(args.judge, "--judge")
    targets, anchors, preserve = request["targets"], request["anchors"], request["preserve"]
    n = len(targets)
    if n > MANY_TARGETS:
        print(f"note: erasing {n} concepts: expect about {n * SECONDS_PER_TARGET:.0f} s and "
              f"{n * GB_PER_TARGET:.1f} GB of memory on a 2-core CPU (2,000 took 274 s and 7.4 GB); progress "
              "below", file=sys.stderr)
    model_name = "model.safetensors" if args.format == "single_file" else "model"
    stages = 6 if args.eval else 5
    with tqdm(total=stages, desc="erase", unit="stage") as bar:  # closed before any error is printed
        bar.set_postfix_str("loading the model")
        sd = load_model(args.model)
        bar.update()
        bar.set_postfix_str(f"erasing {n} concept{'s' * (n != 1)} ({request['method']})")
        erased, report = erase(sd, targets, anchors, method=request["method"], preserve=preserve,
                               prompts=request["prompts"], **request["options"])
        bar.update()
        shown = targets[:4] + preserve[:2]
        grid_prompts = [p for c in shown for p in (f"a picture of {c}", f"{c}")]
        grid_prompts += _unrelated(targets, args.model is None)
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        bar.set_postfix_str("images before")
        before = generate(sd, grid_prompts, **kw)
        bar.update()
        bar.set_postfix_str("images after")
        after = generate(erased, grid_prompts, **kw)
        bar.update()
        evaluation = None
        if args.eval:
            bar.set_postfix_str("quick evaluation")
            evaluation = _quick_evaluation(args, sd, erased, targets, anchors)
            bar.update()
        bar.set_postfix_str(f"saving ({args.format})")
        base = sd if args.format in ("delta", "lora") else None
        metadata = {"method": request["method"], "targets": targets, "anchors": anchors} if base else None
        try:  # a unique temporary, put in place only if ``out`` is still free: of two runs, one wins
            with safefiles.atomic_output(out, is_dir=True) as tmp:
                save_pretrained(erased, tmp / model_name, format=args.format, base=base, metadata=metadata)
                report.to_json(tmp / "report.json")
                report.plot(tmp / "report.png")
                pairs = np.stack([before, after], axis=1).reshape(-1, *before.shape[1:])
                save_grid(pairs, tmp / "before_after.png", nrow=2, scale=args.scale, row_labels=grid_prompts,
                          column_labels=["before", "after"])
                if evaluation is not None:
                    evaluation.save(tmp / "evaluation")
        except safefiles.DestinationExists:
            msg = f"--out {out}: written by another run meanwhile; this run's results were discarded"
            raise UsageError(msg) from None
        bar.update()
    written = f"{model_name}{'' if args.format == 'single_file' else '/'} ({args.format})"
    extra = ", evaluation/" if evaluation is not None else ""
    print(f"wrote {out.resolve()}/: {written}, report.json, report.png, before_after.png (before | after)"
          f"{extra}")
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


# --- evaluate and report ---------------------------------------------------------------------------------


def read_report(path: Path) -> dict[str, Any]:
    """An erase ``report.json``, its fields checked; LoadError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadError(f"{path}: not an erase report ({' '.join(str(e).split())})") from None
    problem = None
    if not isinstance(data, dict):
        problem = f"expected a JSON object, got {type(data).__name__}"
    else:
        for key in ("targets", "anchors"):
            if not isinstance(data.get(key), list) or not all(isinstance(v, str) for v in data[key]):
                problem = problem or f"{key} must be a list of strings"
        layers = data.get("layers", [])
        fields = ("residual_before", "residual_after", "relative_change")
        if not isinstance(layers, list):
            problem = problem or "layers must be a list"
        for i, layer in enumerate(layers if isinstance(layers, list) else []):
            ok = isinstance(layer, dict) and isinstance(layer.get("key"), str)
            if not ok or not all(isinstance(layer.get(f), int | float) for f in fields):
                problem = problem or f"layers[{i}] must hold key, {', '.join(fields)}"
        if not isinstance(data.get("notes", []), list):
            problem = problem or "notes must be a list"
    if problem:
        raise LoadError(f"{path}: not an erase report ({problem})")
    return data


def _erased_model(folder: Path) -> tuple[str, bool]:
    """Where the erased model of an erase output (or a model given directly) is, and whether it is a delta."""
    if (folder / "model.safetensors").is_file():
        return str(folder / "model.safetensors"), False
    model = folder / "model"
    if (model / "lora.json").is_file():
        raise UsageError(f"--erased {folder}: holds a LoRA export; evaluate an erase written with "
                         "--format diffusers, single_file, orbax or delta")
    if (model / "delta.json").is_file():
        return str(model), True
    return str(model if model.is_dir() else folder), False


def cmd_evaluate(args: argparse.Namespace) -> None:
    from jax_erasepro.delta import apply_delta
    from jax_erasepro.evaluation import evaluate

    folder = Path(args.erased)
    _check_exists(args.erased, "--erased")
    _check_model_path(args.original, "--original")
    _check_exists(args.judge, "--judge")
    _check_exists(args.prompts, "--prompts")
    targets, anchors = list(args.target or []), list(args.anchor or [])
    if not targets:
        report = folder / "report.json"
        if not report.is_file():
            raise UsageError(f"no --target given and no erase report at {report}")
        data = read_report(report)
        targets, anchors = data["targets"], data["anchors"]
    out = Path(args.out) if args.out else folder / "evaluation"
    if out.is_file():
        raise UsageError(f"--out {out}: is a file (give a folder)")
    model_path, is_delta = _erased_model(folder)
    original = load_model(args.original)
    erased = apply_delta(original, model_path) if is_delta else load_model(model_path)
    quick = args.quick
    evaluation = evaluate(
        original, erased, targets, anchors or [""], judge=args.judge, prompts=args.prompts,
        images_per_prompt=1 if quick else args.images, num_inference_steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, robustness=not quick, reference=not quick,
    )
    evaluation.save(out)
    print(evaluation.to_markdown())
    _print_rates(evaluation)
    print(f"wrote {out.resolve()}/: evaluation.json, evaluation.md, grid_*.png")


def cmd_report(args: argparse.Namespace) -> None:
    path = Path(args.path)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"no report at {path}")
    data = read_report(path)
    print(f"method: {data.get('method')}  targets: {data['targets']}  anchors: {data['anchors']}")
    training = data.get("training") or {}
    if training and not data.get("layers"):
        _print_training(training)
    else:
        print(f"{'edited weight':72} {'residual before':>15} {'after':>10} {'rel change':>10}")
    for layer in data.get("layers", []):
        print(
            f"{layer['key']:72} {layer['residual_before']:15.3e} {layer['residual_after']:10.3e}"
            f" {layer['relative_change']:10.3e}"
        )
    for note in data.get("notes", []):
        print(f"note: {note}")


def _print_training(training: dict) -> None:
    """A fine-tuning run: steps, the loss at the start and the end, the most changed weights."""
    loss = [float(v) for v in training.get("loss", [])]
    k = max(1, len(loss) // 10)
    if loss:
        print(f"trained {training.get('steps_run', len(loss))} steps; mean loss of the first {k}: "
              f"{sum(loss[:k]) / k:.4g}, of the last {k}: {sum(loss[-k:]) / k:.4g}")
    change = sorted((training.get("relative_change") or {}).items(), key=lambda kv: -kv[1])
    print(f"{'trained weight (largest changes)':72} {'rel change':>10}")
    for key, value in change[:20]:
        print(f"{key:72} {value:10.3e}")
    if len(change) > 20:
        print(f"... and {len(change) - 20} more (report.json: training.relative_change)")


# --- methods ---------------------------------------------------------------------------------------------


def cmd_methods(args: argparse.Namespace) -> None:
    if args.name is None:
        for method in REGISTRY.values():
            print(f"{method.name}\n  {method.summary}\n  paper: {method.paper}")
        print("\n`jax-erasepro methods NAME` lists a method's options; set one with "
              "`jax-erasepro erase --method NAME --option KEY=VALUE`.")
        return
    method = get_method(args.name)
    print(f"{method.name}: {method.summary}\npaper: {method.paper}\noptions (--option KEY=VALUE):")
    for row in method.describe():
        choices = f"; one of {', '.join(map(str, row['choices']))}" if row["choices"] else ""
        print(f"  {row['name']} ({row['type']}, default {row['default']!r}{choices})\n      {row['help']}")


# --- the parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jax-erasepro", description=__doc__, formatter_class=_Help)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug is also accepted after the command; SUPPRESS keeps the top-level value when it is not given
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "diffusers folder, orbax folder or single-file .safetensors (default: the embedded model)"

    gen = sub.add_parser("generate", help="text-to-image sampling to a labelled PNG grid",
                         formatter_class=_Help, parents=[debug])
    gen.add_argument("--prompt", action="append", required=True, help="one row of the grid; repeat for more")
    gen.add_argument("--images", type=_count, default=1, help="images per prompt (the same noise per column)")
    gen.add_argument("--model", default=None, help=model_help)
    gen.add_argument("--out", default="out/generate.png", help="the PNG to write")
    gen.add_argument("--seed", type=int, default=0, help="noise seed")
    gen.add_argument("--steps", type=_count, default=50, help="sampling steps")
    gen.add_argument("--guidance", type=_guidance, default=7.5, help="classifier-free guidance (on above 1)")
    gen.add_argument("--scheduler", choices=KINDS, help="sampler (default: the model's own scheduler)")
    gen.add_argument("--scale", type=_count, default=4, help="upscale factor of the PNG")
    gen.set_defaults(func=cmd_generate)

    er = sub.add_parser("erase", help="erase concepts; writes the model, report and before/after grid",
                        formatter_class=_Help, epilog=ERASE_EPILOG,
                        parents=[debug])
    er.add_argument("--target", action="append", help="concept to erase (repeat for several)")
    er.add_argument("--anchor", action="append",
                    help="what each target becomes: one for all, or one each; '' erases towards nothing "
                    f"(the default of {', '.join(IMPLICIT_METHODS)})")
    er.add_argument("--preserve", action="append", help="concept to keep where it was (repeatable)")
    er.add_argument("--method", choices=list(REGISTRY),
                    help=f"erasure method (default: the config's, else {DEFAULT_METHOD}; see jax-erasepro "
                    "methods)")
    er.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="a method option (repeatable; jax-erasepro methods NAME lists them)")
    er.add_argument("--template", action="append",
                    help="prompt template with {} for the concept (repeatable; default: the method's set)")
    er.add_argument("--config", help="YAML with pairs, preserve, method, prompts, options (layout below)")
    er.add_argument("--model", default=None, help=model_help)
    er.add_argument("--out", required=True, help="output folder (new or empty)")
    er.add_argument("--format", choices=FORMATS, default="diffusers",
                    help="how the erased model is written: <out>/model/, or <out>/model.safetensors for "
                    "single_file (delta and lora hold only the edit, against --model)")
    er.add_argument("--seed", type=int, default=0, help="noise seed of the grid and quick evaluation")
    er.add_argument("--steps", type=_count, default=50, help="sampling steps")
    er.add_argument("--guidance", type=_guidance, default=7.5, help="classifier-free guidance (on above 1)")
    er.add_argument("--scale", type=_count, default=4, help="upscale factor of the PNG grid")
    er.add_argument("--no-eval", dest="eval", action="store_false",
                    help="skip the quick evaluation (one image per prompt of each set)")
    er.add_argument("--judge", help="a CLIP folder for the quick evaluation (default: shapes-clip)")
    er.set_defaults(func=cmd_erase)

    ev = sub.add_parser("evaluate", help="judge an erasure on generated images, before and after",
                        formatter_class=_Help, parents=[debug])
    ev.add_argument("--erased", required=True, help="an erase output folder (model/, report.json) or a model")
    ev.add_argument("--original", default=None, help="the model before erasure (default: the embedded model)")
    ev.add_argument("--target", action="append", help="erased concept (default: from report.json)")
    ev.add_argument("--anchor", action="append", help="its anchor (default: from report.json)")
    ev.add_argument("--judge", help="a transformers CLIPModel folder (default: shapes-clip)")
    ev.add_argument("--prompts", help="YAML of prompt sets: target (templates with {}), others, robust")
    ev.add_argument("--images", type=_count, default=4, help="images per prompt")
    ev.add_argument("--steps", type=_count, default=50, help="sampling steps")
    ev.add_argument("--guidance", type=_guidance, default=7.5, help="classifier-free guidance (on above 1)")
    ev.add_argument("--seed", type=int, default=0, help="noise seed")
    ev.add_argument("--quick", action="store_true", help="one image per prompt, no robustness or reference")
    ev.add_argument("--out", help="output folder (default: <erased>/evaluation)")
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="print an erasure report (a report.json or the folder holding it)",
                         formatter_class=_Help, parents=[debug])
    rep.add_argument("path", help="report.json or an erase output folder")
    rep.set_defaults(func=cmd_report)

    met = sub.add_parser("methods", help="list the erasure methods, or one method's options",
                         formatter_class=_Help, parents=[debug])
    met.add_argument("name", nargs="?", choices=list(REGISTRY), help="a method: list its options")
    met.set_defaults(func=cmd_methods)
    return parser


def run() -> int:
    """The console script: ``main`` with compiled programs cached on disk between runs (see compile_cache)."""
    from jax_erasepro.compile_cache import use_compilation_cache

    use_compilation_cache()
    return main()


def main(argv: list[str] | None = None) -> int:
    """Run one command; a library or argument error is one line on stderr and exit code 2 (``--debug``:
    the traceback)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (EraseProError, OSError, ValueError) as e:
        if args is not None and args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
