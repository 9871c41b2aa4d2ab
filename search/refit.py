"""The search-time models fitted on the whole catalog (the classifier, then the match calibration),
and what fits them again: the command that changed the catalog, at its end, or a server's
background thread after its writes. A search never fits them; it uses their last fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from catalens.indexer.catalog import Catalog
from catalens.indexer.fitted import BackgroundRefit, FittedSlot, FittedState, refit_stale
from catalens.search.calibration import CALIBRATION
from catalens.search.classify import CLASSIFIER

log = logging.getLogger(__name__)

# In refit order: the classifier is the quicker fit, and what classify and locate wait for.
SLOTS: tuple[FittedSlot, ...] = (CLASSIFIER, CALIBRATION)


def refit_catalog(catalog: Catalog, *, progress: bool = False, store: bool = True,
                  force: Sequence[str] = ()) -> list[FittedState]:
    """Every search-time model fitted again where stale or missing (those named in ``force``
    always); stored with the index where ``store`` and the folder allows, else kept in memory."""
    return refit_stale(catalog, SLOTS, store=store, progress=progress, force=force)


def fitted_status(catalog: Catalog) -> dict[str, FittedState]:
    """Each search-time model as a reader gets it now: present, fresh, and why not. Fits nothing."""
    return {slot.name: slot.status(catalog) for slot in SLOTS}


def needs_refit(catalog: Catalog) -> bool:
    return any(not state.fresh for state in fitted_status(catalog).values())


def background_refit(catalog: Catalog, *, delay: float = 3.0, store: bool = True,
                     guard: Callable[[], AbstractContextManager[Any]] | None = None) -> BackgroundRefit:
    """A thread that refits the search-time models ``delay`` seconds after the last ``poke``."""
    return BackgroundRefit(catalog, SLOTS, delay=delay, store=store, guard=guard)
