"""Host-side batch functions run ahead in worker processes, for training loops the renderer cannot feed.

On an accelerator the shapes trainings wait on numpy rendering and tokenizing (one Python thread, ~40 ms
per batch), not on the device. ``prefetched(fn, workers)`` computes ``fn(i)`` for the next indices in
``workers`` spawned processes; ``fn`` is deterministic in ``i``, so the batches are the same for any number
of workers (0 computes them in the calling thread).
"""

from __future__ import annotations

import multiprocessing
import sys
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

_FN: Callable[[int], Any] | None = None  # the worker process's fn, set once by _init


def _init(fn: Callable[[int], Any]) -> None:
    global _FN
    _FN = fn
    if "jax" in sys.modules:  # workers are host-side: keep a stray jnp call off the parent's accelerator
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def _call(i: int) -> Any:
    assert _FN is not None
    return _FN(i)


class Prefetched:
    """``i -> fn(i)``, computed ``ahead`` indices in advance by a pool of spawned processes.

    ``fn`` is pickled once per worker (so it must be picklable: a module-level function or a callable
    object, not a closure). Calls in increasing ``i`` hit the prefetched results; any order is correct.
    """

    def __init__(self, fn: Callable[[int], Any], workers: int, ahead: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.ahead = ahead or 2 * workers
        # spawn, not fork: the parent runs JAX's threads, which a forked child would inherit mid-state
        self._pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init, initargs=(fn,)
        )
        self._futures: dict[int, Future] = {}
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def __call__(self, i: int) -> Any:
        for stale in [j for j in self._futures if j < i]:
            self._futures.pop(stale).cancel()
        for j in range(i, i + self.ahead):
            if j not in self._futures:
                self._futures[j] = self._pool.submit(_call, j)
        return self._futures.pop(i).result()

    def close(self) -> None:
        """Stop the workers (also done when the object is garbage collected)."""
        self._finalizer()


def prefetched(fn: Callable[[int], Any], workers: int = 0) -> Callable[[int], Any]:
    """``fn`` itself for ``workers=0``, else a ``Prefetched`` pool of that many processes over it."""
    return fn if workers <= 0 else Prefetched(fn, workers)
