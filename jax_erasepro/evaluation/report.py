"""What an evaluation found: JSON (the numbers), Markdown (the paper's table layout) and PNG grids."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jax_erasepro.images import save_grid


@dataclasses.dataclass
class EvalReport:
    """Top level: the main target set's rates and the paper's metrics; per set the same under ``sets``."""

    summary: dict[str, Any]  # target_rate, anchor_rate, others_accuracy, clip_score, clip_accuracy, kid
    sets: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    images: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = dataclasses.field(
        repr=False, default_factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary, "sets": self.sets, "settings": self.settings}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=_plain) + "\n")

    def to_markdown(self) -> str:
        """The paper's layout (CLIP score A/T/O, CLIP accuracy, KID A/T/O) and the ground-truth rates."""
        s = self.summary
        lines = [
            "| | CLIP score A (up) | CLIP score T (down) | CLIP score O (up) | CLIP accuracy (down) "
            "| KID A (down) | KID T (up) | KID O (down) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row, src in (("erased", s), ("reference (original, other seeds)", s.get("reference", {}))):
            cs, kid = src.get("clip_score", {}), src.get("kid", {})
            acc = src.get("clip_accuracy")
            acc = acc.get("after", acc) if isinstance(acc, dict) and "after" in acc else acc
            lines.append(
                f"| {row} | "
                + " | ".join(
                    [*(_fmt(cs.get(k)) for k in "ATO"), _fmt(acc), *(_fmt(kid.get(k), 4) for k in "ATO")]
                )
                + " |"
            )
        lines += [
            "",
            "| prompt set | images | target rate | anchor rate | others' accuracy |",
            "|---|---|---|---|---|",
        ]
        for name, st in self.sets.items():
            lines.append(
                f"| {name} | {st.get('n_images', '')} | "
                + " | ".join(_rate(st.get(k)) for k in ("target_rate", "anchor_rate", "others_accuracy"))
                + " |"
            )
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``evaluation.json``, ``evaluation.md`` and one ``grid_<set>.png`` per prompt set."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.to_json(folder / "evaluation.json")
        (folder / "evaluation.md").write_text(self.to_markdown())
        for name, (labels, before, after) in self.images.items():
            pairs = np.stack([before, after], axis=1).reshape(-1, *before.shape[1:])
            save_grid(
                pairs,
                folder / f"grid_{name.replace(':', '_')}.png",
                nrow=2,
                scale=2,
                row_labels=labels,
                column_labels=["original", "erased"],
            )
        return folder


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x)}")


def _fmt(e: Any, digits: int = 3) -> str:
    if e is None:
        return "-"
    if isinstance(e, dict):
        v, ci = e.get("value"), e.get("ci")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{v:.{digits}f}"
    return f"{e:.{digits}f}"


def _rate(e: Any) -> str:
    if not e:
        return "-"
    return (
        f"{e['before']:.2f} -> {e['after']:.2f} (drop {e['drop']:+.2f} "
        f"[{e['drop_ci'][0]:+.2f}, {e['drop_ci'][1]:+.2f}])"
    )
