"""docs/figures/figure3.png: ErasePro's Figure 3 on shapes-sd ("zorbly" -> "star"): per edited layer, the
target-anchor feature distance and the relative parameter change, for the protected form (from layer 2, the
default, and from layer 1) and the paper form.

docs/figures/figure5.png: ErasePro's Figure 5, the same random deviation (relative size eps of the weight)
injected into the first text-encoder layer's v_proj or into one U-Net cross-attention to_v, and what it does
to other prompts' images (CLIP score O against the original, shapes-clip's image space), with a grid.

    python benchmarks/figures.py
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_erasepro as jep
from jax_erasepro.erase.report import plot_layers
from jax_erasepro.evaluation import metrics
from jax_erasepro.evaluation.judge import load_image_judge
from jax_erasepro.evaluation.prompts import world_others
from jax_erasepro.evaluation.sampling import Sampling, draw
from jax_erasepro.images import save_grid

ROOT = Path(__file__).resolve().parents[1]


EPS = (0.25, 0.5, 1.0, 2.0, 4.0)
SITES = {
    "text encoder layer 1 v_proj": ("text_encoder", ("encoder", "layers", "self_attn", "v_proj", "kernel")),
    "U-Net mid-block attn2 to_v": ("unet", None),
}


def _deviate(sd, site: str, eps: float):
    """``sd`` with eps * ||W|| * G / ||G|| (G Gaussian, seed 0) added to one weight of ``SITES``."""
    part, path = SITES[site]
    graphdef, state = nnx.split(getattr(sd, part))
    flat = dict(nnx.to_flat_state(state))
    if path is None:
        path = next(
            p for p in flat if "mid_block" in map(str, p) and "attn2" in map(str, p) and str(p[-2]) == "to_v"
        )
    w = jnp.asarray(flat[path][...])
    layer0 = w[0] if part == "text_encoder" else w  # the encoder's layers are stacked: edit the first
    g = jax.random.normal(jax.random.key(0), layer0.shape, w.dtype)
    new = layer0 + eps * jnp.linalg.norm(layer0) * g / jnp.linalg.norm(g)
    flat[path] = flat[path].replace(w.at[0].set(new) if part == "text_encoder" else new)
    return sd.replace(**{part: nnx.merge(graphdef, nnx.from_flat_state(flat))})


def figure5(sd, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge, sampling = load_image_judge(), Sampling(num_inference_steps=20, images_per_prompt=1)
    prompts = world_others([], [])[:12]
    base = draw(sd, prompts, sampling, seeds=[0] * len(prompts), desc="original")[:, 0]
    fb = judge.image_features(base)
    scores, shown = {}, [base[:6]]
    for site in SITES:
        for eps in EPS:
            images = draw(_deviate(sd, site, eps), prompts, sampling, seeds=[0] * len(prompts), desc=site)[
                :, 0
            ]
            scores.setdefault(site, []).append(metrics.cosines(judge.image_features(images), fb).mean())
            if eps == 1.0:
                shown.append(images[:6])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for site, ys in scores.items():
        ax.plot(EPS, ys, "o-", label=site)
    ax.set_xlabel("injected deviation ||dW|| / ||W||")
    ax.set_ylabel("CLIP score O (other prompts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "figure5.png", dpi=110)
    plt.close(fig)
    grid = np.stack(shown, axis=1).reshape(-1, *base.shape[1:])
    save_grid(
        grid,
        out / "figure5_images.png",
        nrow=3,
        scale=2,
        row_labels=prompts[:6],
        column_labels=["original", "text encoder L1, 1.0", "U-Net attn2, 1.0"],
    )
    print({k: [round(float(v), 3) for v in vs] for k, vs in scores.items()})


def main() -> None:
    sd = jep.load_pretrained()
    reports = {
        "ErasePro (protected, default: from layer 2)": jep.erase(sd, ["zorbly"], ["star"])[1],
        "ErasePro (protected, from layer 1)": jep.erase(sd, ["zorbly"], ["star"], start_layer=1)[1],
        "ErasePro (paper form)": jep.erase(sd, ["zorbly"], ["star"], form="paper")[1],
    }
    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plot_layers(reports, out / "figure3.png")
    figure5(sd, out)
    print(f"wrote {out}/figure3.png, figure5.png, figure5_images.png")


if __name__ == "__main__":
    main()
