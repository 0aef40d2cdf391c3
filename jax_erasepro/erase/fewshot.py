"""Few-shot unlearning (Fuchi & Takagi 2024, "Erasing Concepts from Text-to-Image Diffusion Models with
Few-shot Unlearning", BMVC 2024, arXiv 2405.07288): gradient ascent of the diffusion loss on a few images
of the concept, updating only the text encoder.

As the authors' ``train.py`` runs it: the images are encoded once by the frozen VAE (one posterior draw,
each image flipped left-right with probability 1/2 at load); each step takes a batch of them in a per-epoch
shuffled order, captions each with a template drawn at random and filled with the concept, noises the
latents to uniformly drawn timesteps and minimises ``-MSE(e(x_t, t, tau(c)), noise)`` over the text
encoder tau (the U-Net and VAE frozen) with torch's Adam (lr 1e-5, betas (0.9, 0.98), eps 1e-6, L2 weight
decay 1e-8), batch 2, for a fixed number of epochs. There is no stopping rule.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_erasepro import diffusion, surgery
from jax_erasepro.erase import finetune
from jax_erasepro.erase.columns import EraseError, prompt_tokens
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.sd import StableDiffusion

# The captions of the authors' data.py: textual inversion's templates (diffusers' textual_inversion.py).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# name -> (what it trains, predicate over ``text_encoder.<key>`` names); whole stacked params only
TRAIN_SETS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "all": ("every tensor of the text encoder (the authors' code in practice)", lambda k: True),
    "token-embedding": ("the token embedding table", lambda k: ".token_embedding." in k),
    "attention": ("every layer's self-attention q/k/v/out projections", lambda k: ".self_attn." in k),
    "mlp": ("every layer's MLP fc1/fc2 (the authors' mlp-only)", lambda k: ".mlp.fc" in k),
    "mlp-attention": (
        "every layer's self-attention and MLP (the authors' mlp-attn)",
        lambda k: ".self_attn." in k or ".mlp.fc" in k,
    ),
}


@dataclasses.dataclass(frozen=True)
class FewShotOptions(finetune.LoopOptions):
    """Options of few-shot unlearning; the defaults are the authors' train.py and README."""

    images: str | np.ndarray | None = option(
        None,
        "images of the concept: a folder of .png/.jpg/.jpeg, or from Python a uint8 (N, H, W, 3) array; "
        "resized to the model's resolution (bicubic, no crop). None: on shapes-sd, n_images renders of "
        "each target from its world (other models need images)",
    )
    n_images: int = option(4, "renders per target when images is None on shapes-sd (>= 1)")
    epochs: int = option(4, "passes over the images (the authors' README runs 4)")
    steps: int | None = option(None, "optimisation steps (None: epochs x ceil(images / batch_size))")
    batch_size: int = option(2, "images per step (the authors': 2; the last batch of an epoch may be short)")
    lr: float = option(1e-5, "Adam learning rate (> 0)")
    beta1: float = option(0.9, "Adam beta1 (the authors': 0.9)")
    beta2: float = option(0.98, "Adam beta2 (the authors': 0.98)")
    eps: float = option(1e-6, "Adam epsilon (the authors': 1e-6)")
    weight_decay: float = option(1e-8, "torch Adam's L2 decay, added to the gradient (the authors': 1e-8)")
    train: str = option(
        "all",
        "what trains: all (the whole text encoder, as the authors' code runs), token-embedding, attention, "
        "mlp, mlp-attention",
        choices=tuple(TRAIN_SETS),
    )
    pattern: str | None = option(
        None,
        'a glob over text-encoder keys that replaces train, e.g. "encoder.layers.*.mlp.*"; it must take all '
        "layers of a stacked param or none",
    )
    captions: str = option(
        "templates",
        "templates: each image captioned with a random template filled with the target (the authors' "
        "textual-inversion lists; the request's prompts replace them); concept: the target alone",
        choices=("templates", "concept"),
    )
    concept_type: str = option(
        "auto",
        "which template list: object or style (auto: style for a shapes-sd painter, object otherwise)",
        choices=("auto", "object", "style"),
    )
    flip: bool = option(True, "flip each image left-right with probability 1/2, once at load (the authors)")

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_loop()
        for name in ("n_images", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise EraseError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise EraseError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise EraseError(f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise EraseError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise EraseError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise EraseError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.pattern is not None and not self.pattern.strip():
            raise EraseError("pattern is empty (None trains the set named by train)")
        if isinstance(self.images, np.ndarray):
            check_array(self.images)
        elif self.images is not None:
            image_files(self.images)


def check_array(images: np.ndarray) -> None:
    """EraseError unless ``images`` is uint8 (N, H, W, 3) with N >= 1."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
        raise EraseError(f"images must be uint8 (N, H, W, 3) with N >= 1, got {images.dtype} {images.shape}")


def image_files(folder: str | Path) -> list[Path]:
    """The .png/.jpg/.jpeg files of ``folder``, sorted; EraseError for a missing or imageless folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise EraseError(f"images {str(folder)!r}: {'not a folder' if path.exists() else 'no such folder'}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EraseError(f"images {str(folder)!r}: the folder holds no .png, .jpg or .jpeg image")
    return files


def resized(images: list[np.ndarray], side: int) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, side, side, 3) from RGB arrays of any size (PIL bicubic, no crop, as the authors), and a
    note per size that was changed."""
    from PIL import Image

    out, sizes = np.empty((len(images), side, side, 3), np.uint8), {}
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if (h, w) != (side, side):
            sizes[(w, h)] = sizes.get((w, h), 0) + 1
            img = np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC))
        out[i] = img
    notes = [
        f"resized {n} image(s) from {w}x{h} to the model's {side}x{side} (bicubic, no crop)"
        for (w, h), n in sizes.items()
    ]
    return out, notes


def read_folder(folder: str | Path) -> list[np.ndarray]:
    """Every image of ``folder`` as uint8 RGB; EraseError naming a file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in image_files(folder):
        try:
            with Image.open(f) as img:
                out.append(np.asarray(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as e:
            raise EraseError(f"images: cannot read {f} ({e})") from None
    return out


def is_shapes_sd(sd: StableDiffusion) -> bool:
    """Whether ``sd`` has the architecture of the embedded shapes-sd (its own or an edited copy)."""
    from jax_erasepro.default_model import default_model_path

    try:
        folder = default_model_path()
    except FileNotFoundError:
        return False
    configs = {"text_encoder": "config.json", "unet": "config.json", "vae": "config.json"}
    for component, name in configs.items():
        ours = getattr(sd.config, component)
        shipped = type(ours).from_dict(json.loads((folder / component / name).read_text()))
        if ours != shipped:
            return False
    return True


def concept_kind(concept: str) -> str | None:
    """The shapes world's kind of ``concept`` (character, shape, colour, style, implicit), or None."""
    from jax_erasepro.shapes.world import CONCEPTS

    return next((kind for kind, words in CONCEPTS.items() if concept in words), None)


def concept_scenes(concept: str, n: int, seed: int) -> list:
    """The first ``n`` one-object scenes of the shapes world's training stream ``seed`` that show
    ``concept`` (a character, a shape or colour not worn by a character, a painter, or stripes)."""
    from jax_erasepro.shapes.render import make_scenes

    kind = concept_kind(concept)
    if kind is None:
        raise EraseError(
            f"target {concept!r} is not a concept of shapes-sd's world (a character, shape, colour, painter "
            "or stripes): give images= (a folder of images of it)"
        )
    shows = {
        "character": lambda s, o: o.character == concept,
        "shape": lambda s, o: o.shape == concept and o.character is None,
        "colour": lambda s, o: o.colour == concept and o.character is None,
        "style": lambda s, o: s.style == concept,
        "implicit": lambda s, o: o.has_stripes,
    }[kind]
    found, start, chunk = [], 0, 512
    while len(found) < n and start < 64 * chunk:
        scenes = make_scenes(seed, start + chunk)[0][start:]  # one stream per index: a prefix is stable
        found += [s for s in scenes if len(s.objects) == 1 and shows(s, s.objects[0])]
        start += chunk
    if len(found) < n:
        raise EraseError(f"only {len(found)} scenes of {concept!r} in the world's first {start} scenes")
    return found[:n]


def source_images(
    sd: StableDiffusion, request: Request, opts: dict[str, Any], side: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 (N, side, side, 3) images, (N,) index of the target each shows, notes)."""
    images = opts["images"]
    if images is None:
        if not is_shapes_sd(sd):
            raise EraseError(
                "fewshot needs images of the concept: give images= (a folder of .png/.jpg/.jpeg; only "
                "shapes-sd, the default model, renders its own)"
            )
        from jax_erasepro.shapes.render import render

        drawn, owner = [], []
        for i, target in enumerate(request.targets):
            drawn += [render(s, side) for s in concept_scenes(target, opts["n_images"], opts["seed"])]
            owner += [i] * opts["n_images"]
        note = (
            f"images: {opts['n_images']} renders per target of one-object scenes from the shapes world's "
            f"training stream {opts['seed']} (the seed)"
        )
        return np.stack(drawn), np.asarray(owner, np.int32), [note]
    if len(request.targets) > 1:
        raise EraseError(
            f"fewshot erases one target per run when images are given ({len(request.targets)} targets): the "
            "images show one concept"
        )
    if isinstance(images, np.ndarray):
        check_array(images)
        raw, where = list(images), f"a uint8 array {images.shape}"
    else:
        raw, where = read_folder(images), f"{len(image_files(images))} file(s) of {images}"
    out, notes = resized(raw, side)
    return out, np.zeros(len(out), np.int32), [f"images: {where}", *notes]


def caption_ids(
    sd: StableDiffusion, request: Request, opts: dict[str, Any]
) -> tuple[np.ndarray, list[str], str]:
    """Token ids (targets, templates, T) of every caption, the texts, and which list they come from."""
    if opts["captions"] == "concept":
        templates, which = ("{}",), "the target alone"
    elif request.prompts is not None:
        templates, which = tuple(request.prompts), "the request's prompts"
    else:
        kind = opts["concept_type"]
        if kind == "auto":
            style = is_shapes_sd(sd) and all(concept_kind(t) == "style" for t in request.targets)
            kind = "style" if style else "object"
        templates = STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES
        which = f"the authors' {kind} templates (textual inversion's, {len(templates)}), one drawn per image"
    max_length = sd.config.text_encoder.max_position_embeddings
    tokens = [[prompt_tokens(sd.tokenizer, f, t, max_length) for f in templates] for t in request.targets]
    ids = np.asarray([[p.ids for p in row] for row in tokens], np.int32)
    return ids, [p.text for row in tokens for p in row], which


def trainable_predicate(train: str, pattern: str | None) -> Callable[[str], bool]:
    """The text-encoder keys that train: ``pattern`` (a glob, ``text_encoder.`` optional) or ``train``'s."""
    if pattern is None:
        in_set = TRAIN_SETS[train][1]
        predicate = lambda k: k.startswith("text_encoder.") and in_set(k)  # noqa: E731
        predicate.__name__ = train
        return predicate
    glob = pattern if pattern.startswith("text_encoder.") else f"text_encoder.{pattern}"
    predicate = lambda k: fnmatch.fnmatchcase(k, glob)  # noqa: E731
    predicate.__name__ = glob
    return predicate


def fewshot_loss(
    text_def: nnx.GraphDef,
    trainable: nnx.State,
    rest: nnx.State,
    unet_def: nnx.GraphDef,
    unet_params: nnx.State,
    ids: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    target: jax.Array,
    weights: jax.Array,
) -> jax.Array:
    """-MSE between the frozen U-Net's prediction from the trained encoder's states and ``target``: the
    mean over every element of the rows with weight 1 (torch's MSELoss of the authors' batch), negated."""
    states = nnx.merge(text_def, trainable, rest)(ids)
    unet = nnx.merge(unet_def, jax.lax.stop_gradient(unet_params))
    err = jnp.mean(jnp.square(unet(x_t, t, states) - target), axis=tuple(range(1, x_t.ndim)))
    return -jnp.sum(weights * err) / jnp.sum(weights)


def batch_rows(key_order: jax.Array, step: jax.Array, n: int, batch: int) -> tuple[jax.Array, jax.Array]:
    """Step ``step``'s image indices (batch,) and their weights: epoch ``step // ceil(n / batch)`` visits a
    fresh permutation of the n images in order; rows past the last image repeat earlier ones at weight 0."""
    per_epoch = -(-n // batch)
    epoch, pos = step // per_epoch, step % per_epoch
    order = jax.random.permutation(jax.random.fold_in(key_order, epoch), n)
    slots = pos * batch + jnp.arange(batch)
    return order[slots % n], (slots < n).astype(jnp.float32)


@functools.cache
def adam(beta1: float, beta2: float, eps: float) -> optax.GradientTransformation:
    """torch's Adam with these betas and eps (one object per setting, so the jitted step compiles once)."""
    return optax.scale_by_adam(b1=beta1, b2=beta2, eps=eps)


@functools.partial(jax.jit, static_argnames=("text_def", "unet_def", "batch", "config", "tx", "sharding"))
def fewshot_step(
    trainable: nnx.State,
    opt_state: optax.OptState,
    rest: nnx.State,
    unet_params: nnx.State,
    latents: jax.Array,
    owner: jax.Array,
    ids: jax.Array,
    step: jax.Array,
    key_order: jax.Array,
    key_steps: jax.Array,
    lr: jax.Array,
    weight_decay: jax.Array,
    *,
    text_def: nnx.GraphDef,
    unet_def: nnx.GraphDef,
    batch: int,
    config: SchedulerConfig,
    tx: optax.GradientTransformation,
    sharding: Any = None,
) -> tuple[nnx.State, optax.OptState, jax.Array]:
    """One step: the batch, a random caption per image, noise at uniform timesteps, -MSE, an Adam update.

    ``latents`` (N, h, w, 4) are the encoded images, ``owner`` (N,) the target each shows, ``ids``
    (targets, templates, T) the captions; every draw comes from ``fold_in(key_steps, step)`` and the
    epoch's order from ``key_order``. Returns the new params, optimiser state and the loss before the update.
    """
    rows, weights = batch_rows(key_order, step, latents.shape[0], batch)
    k_noise, k_caption = jax.random.split(jax.random.fold_in(key_steps, step))
    x0 = finetune.constrain(latents[rows], sharding)
    x_t, noise, t = diffusion.noised(config, x0, k_noise)
    target = diffusion.target(config, x0, noise, t)
    pick = jax.random.randint(k_caption, (batch,), 0, ids.shape[1])
    text = ids[owner[rows], pick]
    loss, grads = jax.value_and_grad(fewshot_loss, argnums=1)(
        text_def, trainable, rest, unet_def, unet_params, text, x_t, t, target, weights
    )
    grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, trainable)  # torch Adam's L2 decay
    trainable, opt_state = finetune.apply(tx, trainable, grads, opt_state, lr)
    return trainable, opt_state, loss


_encode = jax.jit(diffusion.encode_images, static_argnums=0)  # once per run: one posterior draw per image


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def erase_fewshot(
    sd: StableDiffusion, request: Request, options: FewShotOptions
) -> tuple[StableDiffusion, EraseReport]:
    """Few-shot unlearning of the request's targets from the text encoder; anchors and preserve unused."""
    t0 = time.perf_counter()
    opts = dataclasses.asdict(options)
    f = sd.config.vae_scale_factor
    side = sd.config.unet.sample_size * f
    predicate = trainable_predicate(opts["train"], opts["pattern"])
    try:
        split = finetune.split_trainable(sd, "text_encoder", predicate)
    except surgery.SurgeryError as e:
        raise EraseError(str(e)) from None
    images, owner, image_notes = source_images(sd, request, opts, side)
    ids, texts, which = caption_ids(sd, request, opts)
    n, batch = len(images), opts["batch_size"]
    steps = opts["steps"] or opts["epochs"] * math.ceil(n / batch)
    described = {**opts, "images": opts["images"] if isinstance(opts["images"], str) else None}
    described |= {"steps": steps, "images_sha256": _digest(images), "images_n": n}

    k_encode, k_flip, k_order, k_steps = jax.random.split(jax.random.key(opts["seed"]), 4)
    if opts["flip"]:
        flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (n,)))
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    vae_def, vae_params = nnx.split(sd.vae)
    latents = _encode(vae_def, vae_params, images, k_encode)
    unet_def, unet_params = nnx.split(sd.unet)
    tx = adam(opts["beta1"], opts["beta2"], opts["eps"])
    lr, decay = jnp.float32(opts["lr"]), jnp.float32(opts["weight_decay"])
    ids, owner = jnp.asarray(ids), jnp.asarray(owner)
    sharding = finetune.batch_sharding(opts["data_parallel"], batch)
    static = dict(
        text_def=split.graphdef,
        unet_def=unet_def,
        batch=batch,
        config=sd.scheduler_config,
        tx=tx,
        sharding=sharding,
    )

    rest, unet_params, latents, owner, ids = finetune.replicate(
        (split.rest, unet_params, latents, owner, ids), sharding
    )
    trainable0 = finetune.replicate(split.trainable, sharding)

    def step(trainable, opt_state, i):
        args = (rest, unet_params, latents, owner, ids, jnp.int32(i), k_order, k_steps, lr, decay)
        trainable, opt_state, loss = fewshot_step(trainable, opt_state, *args, **static)
        return trainable, opt_state, loss, {}

    checkpoints = finetune.checkpoints_for(sd, described, "fewshot", request, texts)
    t_prep = time.perf_counter()
    result = finetune.train(
        step,
        trainable0,
        tx.init(trainable0),
        steps=steps,
        name="fewshot",
        progress=opts["progress"],
        checkpoints=checkpoints,
    )
    erased = sd.replace(text_encoder=split.merge(result.trainable))
    what = TRAIN_SETS[opts["train"]][0] if opts["pattern"] is None else f"pattern {predicate.__name__!r}"
    notes = [
        "few-shot unlearning raises the diffusion loss of the target's images: anchors are not used"
        + (f" (given: {sorted(set(request.anchors))})" if any(request.anchors) else ""),
        f"trained {len(split.keys)} text-encoder tensors ({what}); the U-Net and VAE are frozen",
        f"loss = -MSE(prediction, noise) minimised (gradient ascent on the diffusion loss, as the authors' "
        f"train.py); {steps} steps of batch {batch} over {n} images, no stopping rule",
        f"captions: {which}",
        *image_notes,
    ]
    if request.preserve:
        notes.append(f"fewshot has no preservation term: preserve {list(request.preserve)} is not used")
    report = finetune.report(
        sd,
        method="fewshot",
        request=request,
        texts=texts,
        options=described,
        split=split,
        original=split.trainable,
        result=result,
        notes=notes,
        t0=t0,
        t_prep=t_prep,
        extra={"images": n, "epochs": steps / math.ceil(n / batch)},
    )
    return erased, report


__all__ = [
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "TRAIN_SETS",
    "FewShotOptions",
    "batch_rows",
    "concept_scenes",
    "erase_fewshot",
    "fewshot_loss",
    "fewshot_step",
    "is_shapes_sd",
    "trainable_predicate",
]
