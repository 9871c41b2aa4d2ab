"""The decode loop that feeds every feature: images decoded (in worker processes) and prepared.

A bad file is an answer, never an exception: each batch says which sources could not be read,
and why, beside what the preparers made of the others. Only the standard library runs the
workers, so indexing never pays for importing torch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from catalens.indexer.features import Preparer
from catalens.indexer.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, load_rgb

# Batches submitted to the workers and not yet consumed, per worker: enough to keep every worker
# busy while the main process finishes a batch, few enough that a 100k-image catalog never
# queues its decoded images in memory (what DataLoader's prefetch_factor=4 allowed).
_PREFETCH_PER_WORKER = 4
_PARENT_CHECK_SECONDS = 1.0

# (position, {preparer name: payload} or None, error or None): one image's answer.
_Sample = tuple[int, dict[str, Any] | None, str | None]

# Set by ``_start_worker`` in each decode worker process; the main process keeps ``None``.
_worker_state: tuple[dict[str, Preparer], int, int | None] | None = None


def in_decode_worker() -> bool:
    """True in a decode worker process started by ``iter_prepared``."""
    return _worker_state is not None


class TwoStepTransform(Protocol):
    """What ``extract_rows`` runs: ``preparer`` in the decode workers, ``finish`` on each batch."""

    preparer: Preparer
    draft_size: int

    def finish(self, prepared: list[Any]) -> np.ndarray: ...


@dataclass
class PreparedBatch:
    """What the preparers made of the sources at ``positions``; ``errors`` for the rest."""

    positions: list[int]
    prepared: dict[str, list[Any]]
    errors: dict[int, str]


def _prepare_one(position: int, source: ImageSource, preparers: Mapping[str, Preparer], max_pixels: int,
                 draft_size: int | None) -> _Sample:
    try:
        image = load_rgb(source, max_pixels, draft_size=draft_size)
        return position, {name: prepare(image) for name, prepare in preparers.items()}, None
    except ImageDecodeError as error:
        return position, None, str(error)
    except Exception as error:  # noqa: BLE001 - one odd file must never end a run
        return position, None, f"{source}: unreadable ({type(error).__name__}: {error})"


def _start_worker(preparers: dict[str, Preparer], max_pixels: int, draft_size: int | None, parent: int) -> None:
    global _worker_state
    _worker_state = (preparers, max_pixels, draft_size)
    # Ctrl-C reaches the whole process group: the main process stops the run and shuts the pool
    # down, so the workers need not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A main process killed outright (kill -9, the OOM killer) shuts nothing down, and a worker
    # waits for its next task forever: leave once the parent is gone, as DataLoader's did.
    threading.Thread(target=_exit_with, args=(parent,), name="decode-parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_SECONDS)
    os._exit(1)


def _prepare_batch(task: list[tuple[int, ImageSource]]) -> list[_Sample]:
    preparers, max_pixels, draft_size = _worker_state
    return [_prepare_one(position, source, preparers, max_pixels, draft_size) for position, source in task]


def _to_batch(samples: list[_Sample], names: Sequence[str]) -> PreparedBatch:
    ok = [(position, payload) for position, payload, error in samples if error is None]
    return PreparedBatch(
        positions=[position for position, _ in ok],
        prepared={name: [payload[name] for _, payload in ok] for name in names},
        errors={position: error for position, _, error in samples if error is not None},
    )


def iter_prepared(
    sources: Sequence[ImageSource],
    preparers: Mapping[str, Preparer],
    batch_size: int = 16,
    num_workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Iterator[PreparedBatch]:
    """Decode ``sources`` (in ``num_workers`` processes) and run every preparer on each image.

    Batches of ``batch_size`` sources come back in order. Closing the generator early shuts the
    worker processes down; a worker that dies (a native library crashing on one odd file) ends
    the run with a ``RuntimeError``.
    """
    preparers = dict(preparers)
    starts = iter(range(0, len(sources), batch_size))

    def task(start: int) -> list[tuple[int, ImageSource]]:
        return [(position, sources[position]) for position in range(start, min(start + batch_size, len(sources)))]

    if len(sources) <= batch_size:
        # One batch gains nothing from a worker, and forking a threaded server process (an item
        # added over HTTP) can deadlock the child in OpenCV's thread pool: decode in-process.
        num_workers = 0
    if num_workers == 0:
        for start in starts:
            samples = [_prepare_one(position, source, preparers, max_pixels, draft_size) for position, source in task(start)]
            yield _to_batch(samples, list(preparers))
        return
    # Fork, as DataLoader did on Linux: a worker starts in milliseconds with the preparers
    # (and whatever models they hold) already in memory, nothing pickled.
    executor = ProcessPoolExecutor(
        max_workers=num_workers, mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker, initargs=(preparers, max_pixels, draft_size, os.getpid()),
    )
    in_flight: deque[tuple[int, Future]] = deque()
    try:
        while True:
            while len(in_flight) < _PREFETCH_PER_WORKER * num_workers and (start := next(starts, None)) is not None:
                in_flight.append((start, executor.submit(_prepare_batch, task(start))))
            if not in_flight:
                return
            start, future = in_flight.popleft()
            try:
                samples = future.result()
            except BrokenProcessPool as error:
                raise RuntimeError(
                    f"a decode worker process died at image {start} of {len(sources)} or soon after "
                    "(a native image library crashing on one file, or the process killed for memory)"
                ) from error
            yield _to_batch(samples, list(preparers))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def extract_rows(
    transform: TwoStepTransform, sources: Sequence[ImageSource], batch_size: int = 16, num_workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, desc: str = "extracting", dtype=np.float16,
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """``transform``'s rows of every readable source, in order, with a progress bar.

    Returns (rows, positions of the readable sources, {position: error} for the others): an
    unreadable file is reported, never fatal. Rows are kept as ``dtype`` (float16 by default:
    what the trainers cache are feature maps of 100 kB and more an image).
    """
    from tqdm import tqdm

    chunks, positions, errors = [], [], {}
    with tqdm(total=len(sources), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in iter_prepared(sources, {"x": transform.preparer}, batch_size=batch_size, num_workers=num_workers,
                                   max_pixels=max_pixels, draft_size=transform.draft_size):
            if batch.positions:
                chunks.append(transform.finish(batch.prepared["x"]).astype(dtype))
                positions.extend(batch.positions)
            errors.update(batch.errors)
            bar.update(len(batch.positions) + len(batch.errors))
    if not chunks:
        return np.zeros((0,), dtype), positions, errors
    return np.concatenate(chunks), positions, errors
