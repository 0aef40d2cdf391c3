"""Contrastive CLIP training on the shapes world: shapes-sd's text encoder, and the judge shapes-clip.

Both are the same small CLIP trained from scratch with symmetric InfoNCE on fresh renders; they differ
in seed (initialisation and data order). ``export`` writes a folder ``transformers.CLIPModel`` loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file
from transformers import CLIPTokenizer

from jax_erasepro.compile_cache import use_compilation_cache
from jax_erasepro.evaluation.judge import CLIP_MEAN, CLIP_STD, clip_pixels
from jax_erasepro.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from jax_erasepro.shapes.labels import ATTRIBUTES, image_label, zero_shot_accuracy
from jax_erasepro.shapes.render import make_scenes, render
from jax_erasepro.shapes.world import COLOURS, HELD_OUT_PAIRS, SHAPES, STYLES, Scene, Split, judge_prompts
from jax_erasepro.tokenizer import clip_tokenizer_path, load_tokenizer, tokenize
from jax_erasepro.weights import num_params, to_state_dict
from recipes.shapes_sd.allocator import use_jemalloc
from recipes.shapes_sd.prefetch import prefetched
from recipes.shapes_sd.runs import log_line, prepare_run, run_parser
from recipes.shapes_sd.training import TrainConfig, train

TOKENIZER_DIR = clip_tokenizer_path()
# Training captions are at most ~32 tokens. The text tower is causal, so the EOS features do not
# depend on the padding after it: training on 40 tokens gives the same model as on 77, faster.
TRAIN_TOKENS = 40


def clip_config(size: str = "small") -> CLIPConfig:
    """The CLIP for 64 px shapes scenes (``small``, ~8.4M params, 6 text layers) or a ``tiny`` one for tests.

    The 49408 x d token embedding holds most of the weights, so d stays small: shapes-sd and the judge
    together must fit in 60 MB.
    """
    d, text_layers, vision_layers, heads = {"small": (128, 6, 4, 4), "tiny": (32, 2, 2, 2)}[size]
    text = CLIPTextConfig(
        hidden_size=d, intermediate_size=4 * d, num_hidden_layers=text_layers, num_attention_heads=heads
    )
    vision = CLIPVisionConfig(
        hidden_size=d, intermediate_size=4 * d, num_hidden_layers=vision_layers, num_attention_heads=heads,
        image_size=64, patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=d)


def train_config(out: str | Path, steps: int = 20_000, seed: int = 0) -> TrainConfig:
    """The recipe. shapes-sd's text encoder is seed 0 on the train split; the judge shapes-clip is seed 1
    (other data, other order) and sees the whole world. Both use counterfactual twins and prompt
    supervision: contrastive training alone learns shape barely at all (17% zero-shot after 1300 steps,
    13% after 1000 with twins alone; chance is 10%), and a text encoder blind to shape gives a UNet that
    draws the right colour as a blob (``text_variance_shares``):

    python -m recipes.shapes_sd.train_clip --out runs/shapes-clip-text2 --steps 2500 --seed 0 \
        --counterfactuals --prompt-supervision
    python -m recipes.shapes_sd.train_clip --out runs/shapes-judge2 --steps 1750 --seed 1 \
        --counterfactuals --prompt-supervision  # as run: stopped at 1750 of a 2000-step schedule, then
    python -m recipes.shapes_sd.train_clip --out runs/shapes-judge2 --steps 3000 --seed 1 \
        --counterfactuals --prompt-supervision --whole-world-from 1750 --resume  # then --steps 4000, then
    python -m recipes.shapes_sd.train_clip --out runs/shapes-judge2 --steps 6000 --seed 1 \
        --counterfactuals --prompt-supervision --whole-world-from 1750 --augment --resume
    """
    return TrainConfig(
        steps=steps, batch_size=128, lr=1e-3, warmup_steps=min(500, steps // 10), end_lr_ratio=0.05,
        weight_decay=0.1, grad_clip=1.0, seed=seed, log_every=50, ckpt_every=250,
        ckpt_dir=str(Path(out) / "ckpt"),
    )


def counterfactual(
    scene: Scene, text: str, rng: np.random.Generator, held_out: bool = False
) -> tuple[Scene, str] | None:
    """The scene with one thing changed and its caption edited to match: another painter, or another shape
    for an object that is not a character. None when the caption does not name the thing exactly once.

    In a random batch colour alone tells most captions apart, so contrastive training learns colour in a
    few hundred steps and shape barely at all; a twin differing only in shape (or painter) is a hard
    negative that makes the model look at it. ``held_out``: the new shape may make a held-out pair.
    """
    if scene.style is not None and rng.random() < 0.3:
        other = str(rng.choice([p for p in STYLES if p != scene.style]))
        if text.count(scene.style) == 1:
            return dataclasses.replace(scene, style=other), text.replace(scene.style, other)
    options = [
        i for i, o in enumerate(scene.objects)
        if o.character is None and len(re.findall(rf"\b{o.shape}\b", text)) == 1
    ]
    if not options:
        return None
    i = int(rng.choice(options))
    obj = scene.objects[i]
    shapes = [s for s in SHAPES if s != obj.shape and (held_out or (s, obj.colour) not in HELD_OUT_PAIRS)]
    new = str(rng.choice(shapes))
    objects = tuple(dataclasses.replace(o, shape=new) if j == i else o for j, o in enumerate(scene.objects))
    return dataclasses.replace(scene, objects=objects), re.sub(rf"\b{obj.shape}\b", new, text)


def _prompt_slices() -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for a in ATTRIBUTES:
        out[a] = (start, start + len(judge_prompts(a)))
        start = out[a][1]
    return out


# Where each attribute's judge prompts sit in a batch's "prompt_ids" (prompt supervision).
PROMPT_SLICES = _prompt_slices()


def scene_labels(scenes: Sequence[Scene]) -> np.ndarray:
    """(n, len(ATTRIBUTES)) index of each one-object scene's label among its judge prompts; -1 elsewhere."""
    names = {a: list(judge_prompts(a)) for a in ATTRIBUTES}
    out = np.full((len(scenes), len(ATTRIBUTES)), -1, np.int32)
    for n, scene in enumerate(scenes):
        if len(scene.objects) == 1:
            out[n] = [names[a].index(image_label(scene, a)) for a in ATTRIBUTES]
    return out


def degrade(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """A fraction ``p`` of uint8 (n, H, W, 3) images made to look generated: a Gaussian blur of sigma
    U(0.3, 1.2) px, a colour cast of up to +-10 per channel and pixel noise of std up to 6 (uint8 scale).

    A judge trained on crisp renders only misreads a VAE's slightly soft reconstructions of them (shape
    92.7% on renders, 76.5% on their factor-4 reconstructions), which a person names without trouble.
    """
    out = images.astype(np.float32)
    for k in np.flatnonzero(rng.random(len(images)) < p):
        sigma = rng.uniform(0.3, 1.2)
        taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
        taps /= taps.sum()
        x = np.pad(out[k], ((3, 3), (3, 3), (0, 0)), mode="edge")
        x = sum(t * x[i : i + out.shape[1]] for i, t in enumerate(taps))  # along H
        x = sum(t * x[:, i : i + out.shape[2]] for i, t in enumerate(taps))  # along W
        cast = rng.uniform(-10, 10, 3)
        out[k] = x + cast + rng.normal(0, rng.uniform(0, 6), x.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


class ClipBatches:
    """step -> a fresh batch of train-split renders and their token ids; other seeds see other data.

    With ``counterfactuals`` the batch is half scenes, half their ``counterfactual`` twins. With
    ``prompt_supervision`` it also holds the judge prompts ("prompt_ids") and each one-object image's label
    among them ("labels"), for ``contrastive_loss``'s prompt term. From step ``whole_world_from`` on, odd
    steps draw from the test split too (held-out pairs and templates): a judge must know the whole world, and
    one trained on the train split alone names the shape of a held-out pair in 28% of renders (84% for seen).
    With ``augment`` half the images are ``degrade``d (for the judge, which must score generated images).
    A picklable callable, so ``prefetched`` workers can render batches ahead.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        batch_size: int,
        seed: int,
        counterfactuals: bool = False,
        prompt_supervision: bool = False,
        whole_world_from: int | None = None,
        augment: bool = False,
    ):
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.counterfactuals, self.prompt_supervision = counterfactuals, prompt_supervision
        self.whole_world_from, self.augment = whole_world_from, augment
        prompts = [p for a in ATTRIBUTES for p in judge_prompts(a).values()]
        self.prompt_ids = tokenize(tokenizer, prompts, max_length=TRAIN_TOKENS)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        scenes, images, captions = self._scenes(step)
        if self.augment:
            images = degrade(images, np.random.default_rng((self.seed, step, 2)))
        out = {"images": images, "input_ids": tokenize(self.tokenizer, captions, max_length=TRAIN_TOKENS)}
        if self.prompt_supervision:
            out |= {"prompt_ids": self.prompt_ids, "labels": scene_labels(scenes)}
        return out

    def _scenes(self, step: int) -> tuple[list[Scene], np.ndarray, list[str]]:
        seed, batch_size = self.seed, self.batch_size
        whole = self.whole_world_from is not None and step >= self.whole_world_from
        split: Split = "test" if whole and step % 2 else "train"
        if not self.counterfactuals:
            scenes, captions = make_scenes(seed * 1_000_000 + step, batch_size, split)
            return scenes, np.stack([render(s) for s in scenes]), captions
        half = batch_size // 2
        scenes, captions = make_scenes(seed * 1_000_000 + step, batch_size - half, split)
        rng = np.random.default_rng((seed, step, 1))
        extra = [counterfactual(s, c, rng, held_out=whole) for s, c in zip(scenes, captions, strict=True)]
        more_scenes, more_captions = make_scenes(seed * 1_000_000 + step + 500_000, half, split)
        for k, twin in enumerate(extra[:half]):
            if twin is not None:
                more_scenes[k], more_captions[k] = twin
        scenes, captions = scenes + more_scenes, captions + more_captions
        return scenes, np.stack([render(s) for s in scenes]), captions


def contrastive_loss(
    model: CLIPModel, batch: dict[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE; a caption repeated in the batch counts each of its images as a positive.

    With "prompt_ids" and "labels" in the batch (prompt supervision) it adds, per attribute, the
    cross-entropy of each one-object image against that attribute's judge prompts: the zero-shot
    classifier the judge is, trained on the world's ground truth.
    """
    ids = batch["input_ids"]
    t = model.get_text_features(ids)
    i = model.get_image_features(clip_pixels(batch["images"]))
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(model.logit_scale[...], jnp.log(100.0)))  # CLIP's clamp
    logits = scale * t @ i.T  # (text, image)
    same = jnp.all(ids[:, None] == ids[None, :], axis=-1).astype(jnp.float32)
    targets = same / same.sum(-1, keepdims=True)  # symmetric, so it serves both directions
    xent = optax.softmax_cross_entropy
    loss = 0.5 * (xent(logits, targets).mean() + xent(logits.T, targets).mean())
    accuracy = jnp.mean(jnp.take_along_axis(same, jnp.argmax(logits.T, -1)[:, None], 1))  # image -> text
    metrics = {"accuracy": accuracy, "scale": scale}
    if "labels" in batch:
        tp = model.get_text_features(batch["prompt_ids"])
        tp = tp / jnp.linalg.norm(tp, axis=-1, keepdims=True)
        for k, (a, (lo, hi)) in enumerate(PROMPT_SLICES.items()):
            y = batch["labels"][:, k]
            ce = optax.softmax_cross_entropy_with_integer_labels(scale * i @ tp[lo:hi].T, jnp.maximum(y, 0))
            loss = loss + jnp.sum(jnp.where(y >= 0, ce, 0)) / jnp.maximum(jnp.sum(y >= 0), 1)
            metrics[f"{a}_ce"] = jnp.sum(jnp.where(y >= 0, ce, 0)) / jnp.maximum(jnp.sum(y >= 0), 1)
    return loss, metrics


def export(model: CLIPModel, out: str | Path, dtype: np.dtype = np.float32) -> Path:
    """Write a folder ``transformers.CLIPModel``/``CLIPProcessor.from_pretrained`` load: config, weights,
    tokenizer and image processor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["text_config"] |= {"model_type": "clip_text_model", "bos_token_id": 49406, "pad_token_id": 49407}
    cfg["vision_config"] |= {"model_type": "clip_vision_model"}
    cfg |= {"architectures": ["CLIPModel"], "model_type": "clip", "dtype": np.dtype(dtype).name}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(to_state_dict(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    size = model.config.vision_config.image_size
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def text_variance_shares(model: CLIPModel, tokenizer: CLIPTokenizer) -> dict[str, float]:
    """Shares of the text tower's last-hidden-state variance over "a <colour> <shape>" (every pair) that
    shape and colour explain (two-way main effects; the rest is their interaction).

    This is what the UNet's cross-attention reads: a text encoder whose states hardly move with the shape
    word gives a UNet that learns colours but not shapes (contrastive alone: shape 0.15, colour 0.83).
    """
    captions = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    ids = tokenize(tokenizer, captions, on_overflow="error")
    states = np.asarray(model.text_model(ids), np.float64)  # (pairs, 77 tokens, d), what the UNet reads
    states = states.reshape(len(SHAPES), len(COLOURS), -1)
    total = states.var(axis=(0, 1)).sum()
    return {
        "shape": float(states.mean(axis=1).var(axis=0).sum() / total),
        "colour": float(states.mean(axis=0).var(axis=0).sum() / total),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train (or resume) one shapes CLIP, export it to --out and print its zero-shot accuracies."""
    parser = run_parser(main.__doc__, steps=20_000, batch_size=128)
    parser.add_argument("--eval-n", type=int, default=2000, help="renders per zero-shot accuracy")
    parser.add_argument(
        "--prompt-supervision", action="store_true",
        help="also train each one-object image against the judge prompts of its true labels",
    )
    parser.add_argument(
        "--counterfactuals", action="store_true",
        help="half of each batch: twins that differ in shape or painter"
    )
    parser.add_argument(
        "--whole-world-from", type=int, default=None, metavar="STEP",
        help="from this step on, also train on the test split (held-out pairs): for the judge",
    )
    parser.add_argument(
        "--augment", action="store_true", help="blur, tint and noise half the images: for the judge"
    )
    args = parser.parse_args(argv)
    config = prepare_run(parser, args, train_config(args.out, args.steps, args.seed))
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    model = CLIPModel(clip_config(args.size), rngs=nnx.Rngs(args.seed))
    for encoder in (model.text_model.encoder, model.vision_model.encoder):
        encoder.unroll = encoder.layers.layer_norm1.scale.shape[0]
    print(f"CLIP {args.size}: {num_params(model) / 1e6:.2f}M params; {config}")
    batches = ClipBatches(
        tokenizer, config.batch_size, args.seed, args.counterfactuals, args.prompt_supervision,
        args.whole_world_from, args.augment,
    )
    batches = prefetched(batches, args.workers)
    with open(Path(args.out) / "log.jsonl", "a") as log:
        train(model, contrastive_loss, batches, config, on_log=functools.partial(log_line, log))
    export(model, args.out)
    scores = {a: zero_shot_accuracy(model, tokenizer, a, args.eval_n) for a in ATTRIBUTES}
    (Path(args.out) / "zero_shot.json").write_text(json.dumps(scores, indent=2) + "\n")
    print("zero-shot accuracy on fresh test renders:", json.dumps(scores))
    shares = text_variance_shares(model, tokenizer)
    (Path(args.out) / "text_variance.json").write_text(json.dumps(shares, indent=2) + "\n")
    print("text-state variance shares:", json.dumps(shares))


if __name__ == "__main__":
    use_jemalloc()  # re-executes once under jemalloc where installed: see allocator
    use_compilation_cache()  # a resumed run does not compile its step again: see compile_cache
    main()
