"""Images for an evaluation: every (prompt, image index) gets its own fixed initial noise, so the original
and the erased model draw from the same seeds, batches can be cut anywhere, and the original's images can be
cached on disk (keyed by the model's checksum, prompt, seed and sampler settings) and reused by every
erasure of that model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from tqdm import tqdm

from jax_erasepro.pipeline import generate
from jax_erasepro.sd import StableDiffusion


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How every image of an evaluation is drawn (the same for the original and the erased model)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None  # None: the model's own
    images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 32


def fingerprint(sd: StableDiffusion) -> str:
    """A checksum of the model's weights and scheduler config: equal models share cached images."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("text_encoder", "unet", "vae"):
        for path, leaf in sorted(nnx.to_flat_state(nnx.state(getattr(sd, name))), key=lambda e: str(e[0])):
            h.update(str((name, path)).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf[...])).tobytes())
    h.update(json.dumps(sd.scheduler_config, sort_keys=True, default=str).encode())
    return h.hexdigest()


class ImageCache:
    """uint8 images as PNG files under ``folder/<model fingerprint>/``, written atomically."""

    def __init__(self, folder: str | Path, model: str) -> None:
        self.folder = Path(folder) / model

    def _path(self, key: tuple) -> Path:
        name = hashlib.sha1(json.dumps(key).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.png"

    def get(self, key: tuple) -> np.ndarray | None:
        path = self._path(key)
        try:
            return np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError):
            return None

    def put(self, key: tuple, image: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jax-erasepro" / "eval-images"


def _noise(sd: StableDiffusion, seed: int, index: int) -> np.ndarray:
    """The initial latents of image ``index`` under ``seed``, NCHW (generate's ``latents`` layout)."""
    c, size = sd.config.unet.in_channels, sd.config.unet.sample_size
    key = jax.random.fold_in(jax.random.key(seed), index)
    return np.asarray(jax.random.normal(key, (c, size, size), jnp.float32))


def _bucket(n: int, batch_size: int) -> int:
    """Batch shape for n images: the batch size, or the next power of two below it (few compiles)."""
    return batch_size if n >= batch_size else 1 << (n - 1).bit_length()


def draw(
    sd: StableDiffusion,
    texts: Sequence[str],
    sampling: Sampling,
    *,
    seeds: Sequence[int],
    cache: ImageCache | None = None,
    mesh: Mesh | None = None,
    desc: str = "images",
) -> np.ndarray:
    """uint8 (len(texts), images_per_prompt, H, W, 3): image j of a prompt starts from noise j of its seed."""
    k = sampling.images_per_prompt
    jobs = [(t, s, j) for t, s in zip(texts, seeds, strict=True) for j in range(k)]
    keys = [
        (t, s, j, sampling.num_inference_steps, sampling.guidance_scale, sampling.scheduler)
        for t, s, j in jobs
    ]
    found = {i: im for i, key in enumerate(keys) if cache is not None and (im := cache.get(key)) is not None}
    todo = [i for i in range(len(jobs)) if i not in found]
    b = sampling.batch_size
    with tqdm(total=len(todo), desc=desc, unit="image", leave=False, disable=not todo) as bar:
        for start in range(0, len(todo), b):
            chunk = todo[start : start + b]
            padded = chunk + [chunk[0]] * (_bucket(len(chunk), b) - len(chunk))
            images = generate(
                sd,
                [jobs[i][0] for i in padded],
                latents=np.stack([_noise(sd, jobs[i][1], jobs[i][2]) for i in padded]),
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                scheduler=sampling.scheduler,
                mesh=mesh,
            )
            for i, im in zip(chunk, images, strict=False):
                found[i] = im
                if cache is not None:
                    cache.put(keys[i], im)
            bar.update(len(chunk))
    if not jobs:
        return np.zeros((0, k, 1, 1, 3), np.uint8)
    out = np.stack([found[i] for i in range(len(jobs))])
    return out.reshape(len(texts), k, *out.shape[1:])
