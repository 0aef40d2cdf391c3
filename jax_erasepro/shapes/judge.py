"""shapes-clip, the independent judge, and shapes-sd's quality bar measured with it (and what a VAE lets
through of it, ``vae_ceiling``).

The judge is a CLIP trained apart from shapes-sd's text encoder (other seed, other data order). It labels
a generated 64 px image zero-shot by shape, colour, painter or character; two-object images are judged one
half at a time, the other half painted over with the background colour, so each half is a one-object scene
like those the judge was measured on. A rate only counts prompts that name what it checks: a caption may say
"a red shape" (world.P_GENERIC_NOUN), and then no shape can be asked of its image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm
from transformers import CLIPTokenizer

from jax_erasepro.diffusion import vae_pixels
from jax_erasepro.evaluation.judge import judge_path, load_clip
from jax_erasepro.images import save_grid
from jax_erasepro.loading import SafetensorsReader, load_pretrained
from jax_erasepro.models.clip import CLIPModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.pipeline import generate
from jax_erasepro.schedulers import KINDS
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.shapes.labels import ATTRIBUTES, image_label, single_object_scenes, zero_shot_predict
from jax_erasepro.shapes.render import make_scenes, render
from jax_erasepro.shapes.world import SIZES, STYLES, Scene, is_held_out
from jax_erasepro.tokenizer import load_tokenizer
from jax_erasepro.weights import abstract_model, load_state_dict

# The halves keep_half knows; a two-object scene's objects sit in opposite ones, named by their position
# word (pairs are left/right or top/bottom, see world.PAIR_POSITIONS).
HALVES = ("left", "right", "top", "bottom")
PAIRS = (("left", "right"), ("top", "bottom"))  # the two ways to split an image into opposite halves


@dataclasses.dataclass(frozen=True)
class Judge:
    """A CLIP and its tokenizer, labelling shapes images zero-shot."""

    model: CLIPModel
    tokenizer: CLIPTokenizer

    def classify(self, images: np.ndarray, attribute: str) -> list[str]:
        """uint8 (n, 64, 64, 3) -> one label per image for ``attribute`` (shape, colour, style, ...)."""
        return zero_shot_predict(self.model, self.tokenizer, attribute, np.asarray(images))

    def classify_half(self, images: np.ndarray, halves: Sequence[str], attribute: str) -> list[str]:
        """Label what is in one half of each image (left/right/top/bottom), the rest painted over."""
        return self.classify(np.stack([keep_half(im, h) for im, h in zip(images, halves, strict=True)]),
                             attribute)


def load_judge(path: str | Path | None = None) -> Judge:
    """The shapes-clip judge (the shipped one when ``path`` is None)."""
    folder = Path(path) if path is not None else judge_path()
    return Judge(load_clip(folder), load_tokenizer(folder))


def load_vae(folder: str | Path) -> AutoencoderKL:
    """A diffusers ``vae/`` folder (config.json, diffusion_pytorch_model.safetensors) -> our AutoencoderKL."""
    folder = Path(folder)
    reader = SafetensorsReader(folder / "diffusion_pytorch_model.safetensors")
    config = AutoencoderKLConfig.from_json(folder / "config.json")
    return load_state_dict(
        abstract_model(AutoencoderKL, config), reader.__getitem__, reader.keys, source=str(reader.path)
    )


@nnx.jit
def _reconstruct(model: AutoencoderKL, images: jax.Array) -> jax.Array:
    out = model.decode(model.encode(vae_pixels(images))[0])
    return jnp.round(jnp.clip(out / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def reconstruct(model: AutoencoderKL, images: np.ndarray, chunk: int = 250) -> np.ndarray:
    """uint8 images -> uint8 reconstructions from the posterior mean, rounded as the pipeline does."""
    return np.concatenate([np.asarray(_reconstruct(model, images[k : k + chunk]))
                           for k in range(0, len(images), chunk)])


def keep_half(image: np.ndarray, half: str) -> np.ndarray:
    """The image with everything outside ``half`` painted the background colour (the border's median)."""
    n = image.shape[0]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0).astype(np.uint8)
    out = np.empty_like(image)
    out[...] = background
    sl = {
        "left": np.s_[:, : n // 2], "right": np.s_[:, n // 2 :],
        "top": np.s_[: n // 2, :], "bottom": np.s_[n // 2 :, :],
    }[half]
    out[sl] = image[sl]
    return out


@dataclasses.dataclass(frozen=True)
class Probe:
    """One prompt of the quality bar and what the judge must find in its image."""

    prompt: str
    kind: str  # "one_object", "style", "character" or "two_objects"
    scene: Scene
    says_colour: bool = False
    says_shape: bool = True  # the caption names every object's shape (not "a red shape")


QUALITY_BAR_KINDS = ("one_object", "style", "character", "two_objects")


def quality_probes(n_per_kind: int, seed: int = 0) -> list[Probe]:
    """Held-out (test split) captions for each part of the bar: one plain object, a painter's style, a
    character, two plain objects side by side. The test split holds back templates and (shape, colour)
    pairs never seen in training."""
    want = dict.fromkeys(QUALITY_BAR_KINDS, n_per_kind)
    probes: list[Probe] = []
    batch = 0
    while any(want.values()):
        scenes, captions = make_scenes(seed * 1_000 + batch, 256, "test")
        batch += 1
        for scene, text in zip(scenes, captions, strict=True):
            kind = _kind(scene)
            if kind is None or want[kind] == 0:
                continue
            want[kind] -= 1
            words = text.split()
            says = kind == "one_object" and scene.objects[0].colour in words
            shapes = [o.shape for o in scene.objects]
            named = all(words.count(shape) >= shapes.count(shape) for shape in shapes)
            probes.append(Probe(text, kind, scene, says, named))
    return probes


def _kind(scene: Scene) -> str | None:
    objs = scene.objects
    if len(objs) == 1:
        if objs[0].character:
            return "character" if scene.style is None else None
        return "style" if scene.style else "one_object"
    if scene.style is None and not any(o.character for o in objs) and objs[0].position in HALVES:
        return "two_objects"
    return None


def score(judge: Judge, probes: Sequence[Probe], images: np.ndarray) -> dict[str, float]:
    """The quality bar's rates over generated ``images`` (one per probe), each in [0, 1].

    Shape rates count only prompts that name the shapes. ``two_objects_both`` is the bar's "both objects
    present": the two halves of one axis (left | right or top | bottom) hold the two named shapes, in either
    order, so a prompt that gives no positions is not failed for its layout. ``two_objects_placed`` (not in
    the bar) also asks for each object in the half its scene puts it in."""
    by_kind: dict[str, list[int]] = {}
    for i, p in enumerate(probes):
        by_kind.setdefault(p.kind, []).append(i)
    out: dict[str, float] = {}

    def rate(idx: list[int], attribute: str, truth: list[str]) -> float:
        got = judge.classify(images[idx], attribute)
        return float(np.mean([g == t for g, t in zip(got, truth, strict=True)]))

    if idx := by_kind.get("one_object"):
        hits = _one_object_hits(judge, [probes[i] for i in idx], images[idx])
        if hits["named"].any():
            out["one_object_shape"] = float(hits["shape"][hits["named"]].mean())
        if hits["said"].any():
            out["one_object_colour"] = float(hits["colour"][hits["said"]].mean())
    if idx := by_kind.get("style"):
        out["style"] = rate(idx, "style", [probes[i].scene.style for i in idx])
    if idx := by_kind.get("character"):
        out["character"] = rate(idx, "character", [probes[i].scene.objects[0].character for i in idx])
    if idx := [i for i in by_kind.get("two_objects", []) if probes[i].says_shape]:
        half = {h: judge.classify_half(images[idx], [h] * len(idx), "shape") for h in HALVES}
        present, placed = [], []
        for j, i in enumerate(idx):
            objs = probes[i].scene.objects
            want = sorted(o.shape for o in objs)
            present.append(any(sorted((half[a][j], half[b][j])) == want for a, b in PAIRS))
            placed.append(all(half[o.position][j] == o.shape for o in objs))
        out["two_objects_both"] = float(np.mean(present))
        out["two_objects_placed"] = float(np.mean(placed))
    return out


def _one_object_hits(judge: Judge, probes: Sequence[Probe], images: np.ndarray) -> dict[str, np.ndarray]:
    """Per one-object probe: whether the judge names its shape and colour, and whether its caption names
    them ("named", "said"): the masks each rate is taken over."""
    objs = [p.scene.objects[0] for p in probes]
    return {
        "shape": np.array(judge.classify(images, "shape")) == np.array([o.shape for o in objs]),
        "colour": np.array(judge.classify(images, "colour")) == np.array([o.colour for o in objs]),
        "named": np.array([p.says_shape for p in probes], bool),
        "said": np.array([p.says_colour for p in probes], bool),
    }


def one_object_breakdown(
    judge: Judge, probes: Sequence[Probe], images: np.ndarray
) -> dict[str, dict[str, float]]:
    """The one-object shape and colour rates apart for seen (shape, colour) pairs and for each held-out
    pair, then the shape rate by shape: where a UNet fails to compose what it learned apart.

    Returns ``{group: {"n", "shape", "colour"}}``, groups "seen pairs", "held out: <colour> <shape>" and
    "shape: <shape>", over the probes that name the shape; "colour" is over those that also name the
    colour (absent if none do)."""
    idx = [i for i, p in enumerate(probes) if p.kind == "one_object" and p.says_shape]
    hits = _one_object_hits(judge, [probes[i] for i in idx], images[idx])
    objs = [probes[i].scene.objects[0] for i in idx]
    groups: dict[str, list[int]] = {}
    for j, o in enumerate(objs):
        pair = f"held out: {o.colour} {o.shape}" if is_held_out(o.shape, o.colour) else "seen pairs"
        groups.setdefault(pair, []).append(j)
    for j, o in sorted(enumerate(objs), key=lambda t: t[1].shape):
        groups.setdefault(f"shape: {o.shape}", []).append(j)
    out = {}
    for name, js in groups.items():
        rates = {"n": len(js), "shape": float(hits["shape"][js].mean())}
        if (said := hits["said"][js]).any():
            rates["colour"] = float(hits["colour"][js][said].mean())
        out[name] = rates
    return out


def style_breakdown(
    judge: Judge, probes: Sequence[Probe], images: np.ndarray
) -> dict[str, dict[str, float | str]]:
    """The style rate for each painter, and what the judge most often saw instead: which rendering
    manners a UNet fails to draw (fine textures such as dots or checks can collapse into another).

    Returns ``{"style: <painter>": {"n", "style", "mistaken for"}}`` over the style probes; "mistaken for"
    is absent when every image is right."""
    idx = [i for i, p in enumerate(probes) if p.kind == "style"]
    if not idx:
        return {}
    truth = [probes[i].scene.style for i in idx]
    got = judge.classify(images[idx], "style")
    out: dict[str, dict[str, float | str]] = {}
    for style in sorted(set(truth)):
        mine = [g for g, t in zip(got, truth, strict=True) if t == style]
        rates: dict[str, float | str] = {"n": len(mine), "style": float(np.mean([g == style for g in mine]))}
        if wrong := [g for g in mine if g != style]:
            rates["mistaken for"] = max(sorted(set(wrong)), key=wrong.count)
        out[f"style: {style}"] = rates
    return out


# The bar: shape and colour >= 90%, styles and characters >= 80%, both of two objects >= 70%.
QUALITY_BAR = {
    "one_object_shape": 0.9, "one_object_colour": 0.9, "style": 0.8, "character": 0.8,
    "two_objects_both": 0.7,
}


# The judge's own bar (zero-shot on fresh one-object renders, ``labels.zero_shot_accuracy``).
JUDGE_BAR = {"shape": 0.97, "colour": 0.97, "style": 0.9, "character": 0.9}


def meets_bar(scores: dict[str, float], bar: dict[str, float] = QUALITY_BAR) -> bool:
    """Whether every rate of the bar is reached (a missing rate fails)."""
    return all(scores.get(k, 0.0) >= v for k, v in bar.items())


def evaluate(
    sd: StableDiffusion,
    judge: Judge,
    n_per_kind: int = 50,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    scheduler: str | None = None,
    seed: int = 0,
    batch: int = 50,
) -> tuple[dict[str, float], list[Probe], np.ndarray]:
    """Generate one image per quality probe and score them: (rates, probes, uint8 images).

    ``scheduler`` None samples with the model's own scheduler (its ``scheduler_config.json``), as diffusers
    does.
    """
    probes = quality_probes(n_per_kind, seed)
    chunks = []
    for k in tqdm(range(0, len(probes), batch), desc="quality bar", leave=False):
        prompts = [p.prompt for p in probes[k : k + batch]]
        chunks.append(generate(sd, prompts, seed=seed + k, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, scheduler=scheduler))
    images = np.concatenate(chunks)
    return score(judge, probes, images), probes, images


def vae_ceiling(
    vae: AutoencoderKL, judge: Judge, n: int = 600, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The judge's rates on n one-object test renders and on the VAE's reconstructions of them, with shape
    also by object size and style by painter: what the VAE lets through caps what any UNet on its latents
    can score."""
    scenes = single_object_scenes(seed, n)
    images = np.stack([render(s) for s in scenes])
    truth = {a: np.array([image_label(s, a) for s in scenes]) for a in ATTRIBUTES}
    sizes = np.array([s.objects[0].size for s in scenes])
    styles = np.array([s.style or "" for s in scenes])
    out = {}
    for name, batch in (("renders", images), ("reconstructions", reconstruct(vae, images))):
        right = {a: np.array(judge.classify(batch, a)) == truth[a] for a in ATTRIBUTES}
        rates = {a: float(r.mean()) for a, r in right.items()}
        by_size = {f"shape_{z}": right["shape"][sizes == z] for z in SIZES}
        by_painter = {f"style {p}": right["style"][styles == p] for p in STYLES}
        out[name] = rates | {k: float(r.mean()) for k, r in (by_size | by_painter).items() if r.size}
    return out


def _show(key: str, value: float | str) -> str:
    return f"{key} {value}" if key == "n" or isinstance(value, str) else f"{key} {value:.0%}"


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: measure a shapes-sd folder against the quality bar with a judge; print and write the rates."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="a shapes-sd folder (default: the shipped one)")
    parser.add_argument("--judge", help="a shapes-clip folder (default: the shipped one)")
    parser.add_argument("--n", type=int, default=50, help="prompts per part of the bar")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", choices=KINDS, help="sampler (default: the model's own scheduler)")
    parser.add_argument("--out", help="write the rates (JSON) and an image grid here")
    parser.add_argument(
        "--vae", help="instead: score this VAE folder's reconstructions of --n one-object test renders"
    )
    args = parser.parse_args(argv)
    if args.vae:
        rates = vae_ceiling(load_vae(args.vae), load_judge(args.judge), args.n)
        print(json.dumps(rates, indent=2))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "vae_ceiling.json").write_text(json.dumps(rates, indent=2) + "\n")
        return
    judge = load_judge(args.judge)
    sd = load_pretrained(args.model)
    scores, probes, images = evaluate(
        sd, judge, args.n, num_inference_steps=args.steps, scheduler=args.scheduler
    )
    print(json.dumps(scores, indent=2), "\nmeets the bar:", meets_bar(scores))
    parts = one_object_breakdown(judge, probes, images)
    styles = style_breakdown(judge, probes, images)
    for name, rates in (parts | styles).items():
        print(f"{name:>24}: " + ", ".join(_show(k, v) for k, v in rates.items()))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = scores | {"n_per_kind": args.n, "one_object_breakdown": parts, "style_breakdown": styles}
        (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        save_grid(images[:64], out / "samples.png", nrow=8, scale=2)


if __name__ == "__main__":
    main()
