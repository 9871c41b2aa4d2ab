"""The decode loop that feeds every feature: images decoded (in worker processes) and prepared.

A bad file is an answer, never an exception: each batch says which sources could not be read,
and why, beside what the preparers made of the others.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset

from catalens.indexer.features import Preparer
from catalens.indexer.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, load_rgb


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


class _PrepareDataset(Dataset):
    def __init__(self, sources: Sequence[ImageSource], preparers: Mapping[str, Preparer], max_pixels: int, draft_size: int | None):
        self.sources, self.preparers = sources, dict(preparers)
        self.max_pixels, self.draft_size = max_pixels, draft_size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int):
        source = self.sources[position]
        try:
            image = load_rgb(source, self.max_pixels, draft_size=self.draft_size)
            return position, {name: prepare(image) for name, prepare in self.preparers.items()}, None
        except ImageDecodeError as error:
            return position, None, str(error)
        except Exception as error:  # noqa: BLE001 - one odd file must never end a run
            return position, None, f"{source}: unreadable ({type(error).__name__}: {error})"


def _keep_list(samples):
    return samples


def iter_prepared(
    sources: Sequence[ImageSource],
    preparers: Mapping[str, Preparer],
    batch_size: int = 16,
    num_workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Iterator[PreparedBatch]:
    """Decode ``sources`` (in ``num_workers`` processes) and run every preparer on each image."""
    if len(sources) <= batch_size:
        # One batch gains nothing from a worker, and forking a threaded server process (an item
        # added over HTTP) can deadlock the child in OpenCV's thread pool: decode in-process.
        num_workers = 0
    loader = DataLoader(
        _PrepareDataset(sources, preparers, max_pixels, draft_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_list,
        prefetch_factor=4 if num_workers else None,
    )
    for samples in loader:
        ok = [(position, payload) for position, payload, error in samples if error is None]
        yield PreparedBatch(
            positions=[position for position, _ in ok],
            prepared={name: [payload[name] for _, payload in ok] for name in preparers},
            errors={position: error for position, _, error in samples if error is not None},
        )


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
