"""docs/figures/figure3.png: ErasePro's Figure 3 on shapes-sd ("zorbly" -> "star"): per edited layer, the
target-anchor feature distance and the relative parameter change, for the protected form (from layer 2, the
default, and from layer 1) and the paper form.

    python benchmarks/figures.py
"""

from __future__ import annotations

from pathlib import Path

import jax_erasepro as jep
from jax_erasepro.erase.report import plot_layers

ROOT = Path(__file__).resolve().parents[1]


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
    print(f"wrote {out / 'figure3.png'}")


if __name__ == "__main__":
    main()
