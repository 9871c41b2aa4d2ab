"""How many BLAS threads a query's matrix products use: all of them alone, one side by side."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

_blas: ThreadpoolController | None = None
_running = 0  # matrix products in progress in this process
_limited = None  # the one-thread limit while products overlap
_running_lock = threading.Lock()


@contextmanager
def blas_threads() -> Iterator[None]:
    """A matrix product on every BLAS thread when it runs alone, on one while products overlap.

    Query-time products (descriptor matching, visual words) run inside this. A lone query has the
    cores to itself. Searches side by side (server threads, query threads) each take one: OpenBLAS
    threads spinning against each other made descriptor matching 7x slower on 2 busy cores
    (590 ms against 85 ms for 55 candidates). The limit is process-wide (OpenBLAS has one thread
    count), so it is set when a second product starts and lifted when the last one ends.
    """
    global _blas, _running, _limited
    with _running_lock:
        if _blas is None:
            _blas = ThreadpoolController()
        _running += 1
        if _running == 2 and _limited is None:
            _limited = _blas.limit(limits=1, user_api="blas")
    try:
        yield
    finally:
        with _running_lock:
            _running -= 1
            if _running == 0 and _limited is not None:
                _limited.restore_original_limits()
                _limited = None
