"""PNG grids: layout, upscaling and row labels."""

import numpy as np
from PIL import Image

from jax_erasepro.images import save_grid
from jax_erasepro.shapes import make_batch


def test_save_grid_layout(tmp_path):
    images, _, _ = make_batch(0, 10)
    path = save_grid(images, tmp_path / "grid.png", nrow=4, scale=2)
    with Image.open(path) as im:
        assert im.size == (2 * (4 * 66 + 2), 2 * (3 * 66 + 2))
        np.testing.assert_array_equal(np.asarray(im)[4:132:2, 4:132:2], images[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_save_grid_row_labels_widen_the_canvas(tmp_path):
    images, _, _ = make_batch(1, 4)
    plain = Image.open(save_grid(images, tmp_path / "a.png", nrow=2))
    labelled = Image.open(save_grid(images, tmp_path / "b.png", nrow=2, row_labels=["before", "after"]))
    assert labelled.height == plain.height and labelled.width > plain.width
