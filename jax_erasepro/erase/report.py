"""What an erasure did, per edited weight: residuals, relative change, feature distance, timings, paths."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class EraseReport:
    """The record of one ``erase`` call; ``layers`` holds one dict per edited weight (its diffusers key)."""

    method: str
    targets: list[str]
    anchors: list[str]
    preserve: list[str]
    prompts: list[str]
    options: dict[str, Any]
    columns: dict[str, int]
    pairs: list[dict[str, Any]]  # per target prompt: target/anchor texts and [(target pos, anchor pos)]
    layers: list[dict[str, Any]]
    timings: dict[str, float]  # seconds: prepare, compile, features, solve, total
    edited: list[str]  # ``<component>.<diffusers key>`` of every changed tensor
    notes: list[str] = dataclasses.field(default_factory=list)
    # fine-tuning methods: loss curve, per-step draws, per-key relative change, steps run (empty otherwise)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pairs"] = [{**p, "positions": [list(map(int, q)) for q in p["positions"]]} for p in self.pairs]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def max_residual(self, stage: str | None = None, field: str | None = None) -> float:
        """The largest ``field`` over the edited weights (of one ``stage`` if given); 0.0 when none.

        ``field=None`` takes, per entry, ``residual_hard`` (ErasePro: the columns it holds exactly) where the
        entry has it, else ``residual_after`` (UCE: its soft residual on the target columns).
        """
        entries = [e for e in self.layers if stage in (None, e["stage"])]
        if field is None:
            return max((e.get("residual_hard", e["residual_after"]) for e in entries), default=0.0)
        missing = [e["key"] for e in entries if field not in e]
        if missing:
            raise KeyError(f"{self.method} report has no {field!r} for {missing[0]} ({len(missing)} entries)")
        return max((e[field] for e in entries), default=0.0)

    def plot(self, path: str | Path) -> None:
        """PNG: per edited weight, residual before/after and relative change (log scale), matplotlib Agg;
        for a fine-tuning method, its loss curve and the relative change of each trained weight."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.training and not self.layers:
            _plot_training(self, plt, path)
            return
        names = [_short(e["key"]) for e in self.layers]
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(names)), 8), sharex=True)
        for field in ("residual_before", "residual_after"):
            axes[0].semilogy([max(e[field], 1e-12) for e in self.layers], "o-", ms=3, label=field)
        axes[0].set_ylabel("||W X - W_o Y|| / ||W_o Y||")
        axes[0].legend()
        axes[1].semilogy([max(e["relative_change"], 1e-12) for e in self.layers], "o-", ms=3)
        axes[1].set_ylabel("||W - W_o|| / ||W_o||")
        axes[1].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        fig.suptitle(f"{self.method}: {len(self.targets)} concept(s)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _plot_training(report: EraseReport, plt: Any, path: str | Path) -> None:
    """The loss per step (and its running mean) above the relative change of every trained weight."""
    loss = np.asarray(report.training.get("loss", []), float)
    change = report.training.get("relative_change", {})
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.12 * len(change)), 8))
    if loss.size:
        axes[0].plot(loss, lw=0.6, alpha=0.5, label="loss")
        k = max(1, loss.size // 20)
        axes[0].plot(
            np.arange(k - 1, loss.size), np.convolve(loss, np.ones(k) / k, "valid"), label=f"mean of {k}"
        )
        axes[0].set_yscale("log")
        axes[0].legend()
    axes[0].set_xlabel("step")
    axes[1].semilogy([max(v, 1e-12) for v in change.values()], "o", ms=2)
    axes[1].set_xticks(range(len(change)), [_short(k) for k in change], rotation=90, fontsize=4)
    axes[1].set_ylabel("||W - W_o|| / ||W_o||")
    fig.suptitle(f"{report.method}: {report.training.get('steps_run', loss.size)} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(key: str) -> str:
    return (
        key.replace("text_encoder.encoder.layers.", "te")
        .replace(".self_attn.", ".")
        .replace("_proj.weight", "")
        .replace("unet.", "")
        .replace(".attentions.", ".a")
        .replace(".transformer_blocks.0.attn2.", ".")
        .replace(".weight", "")
    )


def plot_layers(reports: dict[str, EraseReport], path: str | Path) -> None:
    """ErasePro's Figure 3 from reports: per edited layer (text-encoder layers, then the U-Net's cross-
    attention), the target-anchor feature distance the layer sees and its relative parameter change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    tables = {name: _per_layer(report) for name, report in reports.items()}
    order = list(dict.fromkeys(k for table in tables.values() for k in table))
    order.sort(key=lambda k: (not k.startswith("te"), int(k[2:]) if k.startswith("te") else 0))
    for name, table in tables.items():
        xs = [order.index(k) for k in table]
        axes[0].plot(
            xs,
            [max(e.get("feature_distance", 0.0) for e in v) for v in table.values()],
            "o-",
            ms=3,
            label=name,
        )
        axes[1].semilogy(
            xs, [max(e["relative_change"] for e in v) for v in table.values()], "o-", ms=3, label=name
        )
    for ax in axes:
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
    axes[0].set_ylabel("target-anchor feature distance (relative)")
    axes[1].set_ylabel("||W - W_o|| / ||W_o|| (largest of the layer)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_layer(report: EraseReport) -> dict[str, list[dict[str, Any]]]:
    """Report entries by layer: ``te<i>`` for encoder layers, the attention block for the U-Net."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in report.layers:
        layer = f"te{e['layer']}" if e["stage"] == "text_encoder" else _short(e["key"]).rsplit(".", 1)[0]
        out.setdefault(layer, []).append(e)
    return out
