"""Image grids a person can look at (PNG), written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, nrow*W, 3) uint8 mosaic with ``pad`` white pixels between tiles."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_grid(
    images: np.ndarray,
    path: str | Path,
    nrow: int | None = None,
    scale: int = 1,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid (optionally upscaled ``scale``x, with a text label left of each row and above each
    column)."""
    grid = Image.fromarray(make_grid(np.asarray(images, np.uint8), nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    margin = 8 + 7 * max(len(s) for s in row_labels) if row_labels else 0
    top = 14 if column_labels else 0
    if margin or top:
        canvas = Image.new("RGB", (grid.width + margin, grid.height + top), "white")
        canvas.paste(grid, (margin, top))
        draw = ImageDraw.Draw(canvas)
        for i, label in enumerate(row_labels or ()):
            step = grid.height / len(row_labels)
            draw.text((4, top + int(i * step + step / 2) - 5), label, fill="black")
        for i, label in enumerate(column_labels or ()):
            draw.text((margin + int(i * grid.width / len(column_labels)) + 4, 1), label, fill="black")
        grid = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        grid.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's is 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
