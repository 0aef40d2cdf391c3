import numpy as np
import pytest

from jax_erasepro.tokenizer import load_tokenizer
from recipes.shapes_sd import train_unet as tu
from recipes.shapes_sd import train_vae as tv
from recipes.shapes_sd.prefetch import Prefetched, prefetched
from recipes.shapes_sd.train_clip import TOKENIZER_DIR


def test_no_workers_is_the_function_itself():
    fn = tv.vae_batches(4, 0)
    assert prefetched(fn, 0) is fn
    with pytest.raises(ValueError, match="workers"):
        Prefetched(fn, 0)


def test_workers_give_the_same_batches_in_any_order():
    """Spawned workers render the batches the calling thread would, also when calls skip or go back."""
    direct = tv.vae_batches(4, 3)
    pool = prefetched(direct, 2)
    try:
        for step in (0, 1, 2, 5, 3, 3):
            np.testing.assert_array_equal(pool(step)["images"], direct(step)["images"])
    finally:
        pool.close()


def test_unet_blocks_are_picklable_and_the_same_in_a_worker():
    blocks = tu.TrainBlocks(load_tokenizer(TOKENIZER_DIR), 4, 1)
    pool = Prefetched(blocks, 1, ahead=3)
    try:
        for b in (7, 8):
            for got, want in zip(pool(b), blocks(b), strict=True):
                np.testing.assert_array_equal(got, want)
    finally:
        pool.close()
