"""Calibrated match confidence: how likely a result shows the query's product, per search mode.

Raw scores live on a different scale in every mode (cosine, fused sums, inlier counts) and
barely separate right answers from wrong ones. A ``MatchCalibrator`` (``model``) turns the
evidence of one result (``evidence``) into a probability with a logistic regression per mode;
``annotate`` gives a search's results their confidence and the query its ``match``.

It is fitted on the catalog itself (``fitting``): held-out queries made from the catalog's own
items, searched against the rest of it in every mode. The default match threshold is the lowest
confidence at which the calibration queries' top results reach ``target_precision``. The model is
stored with the index (``MODEL_FILE``) through the ``CALIBRATION`` slot (``indexer.fitted``): a
search uses the last fit (``match_calibration``), never fits one; it counts as stale once the
catalog has changed by more than ``max_stale``, and whoever changed the catalog refits it
(``search.refit``; ``calibrate_catalog`` at once).

The package's rooms: ``evidence`` (what a result's confidence is read from, at query time),
``model`` (``MatchCalibrator`` and its threshold), ``fitting`` (the held-out catalog queries and
the fit: what runs only when the catalog changes); this module holds the slot and what a search
calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.estimator import ModelFileError
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.stores import ItemFilter
from catalens.search.calibration.evidence import (
    AGREEMENT_OF,
    DEPTH,
    EVIDENCE,
    catalog_classifier,
    category_probabilities,
    hit_evidence,
    ranked_evidence,
)
from catalens.search.calibration.fitting import (
    NEAR_DUPLICATE,
    ROWS_PER_QUERY,
    CalibrationQuery,
    calibration_evidence,
    calibration_queries,
    current_keys,
    features_read,
    fit_match_calibration,
)
from catalens.search.calibration.model import CalibrationError, MatchCalibrator
from catalens.search.query import Query, QueryResult
from catalens.search.settings import SearchSettings

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

__all__ = [
    "AGREEMENT_OF", "CALIBRATION", "DEPTH", "EVIDENCE", "MODEL_FILE", "NEAR_DUPLICATE", "ROWS_PER_QUERY",
    "CalibrationError", "CalibrationQuery", "CalibrationState", "MatchCalibrator", "annotate",
    "calibrate_catalog", "calibration_evidence", "calibration_queries", "catalog_classifier",
    "category_probabilities", "current_keys", "features_read", "fit_match_calibration", "hit_evidence", "match_calibration",
    "ranked_evidence",
]

MODEL_FILE = "match_calibration.pt"


def calibrate_catalog(catalog: Catalog, max_queries: int = 240, seed: int = 0, progress: bool = False,
                      store: bool = True) -> MatchCalibrator:
    """Fit the catalog's match calibration now, fresh or not, and store it with the index
    (``catalens calibrate``); searches use it at once. ``CalibrationError`` where this catalog
    cannot be calibrated."""
    try:
        state = CALIBRATION.refit(catalog, force=True, store=store, progress=progress,
                                  fit=lambda catalog, progress: fit_match_calibration(
                                      catalog, max_queries=max_queries, seed=seed, progress=progress))
    except CalibrationError:
        raise
    except ValueError as error:
        raise CalibrationError(str(error)) from None
    return state.model


# --- what a search uses


@dataclass
class CalibrationState:
    """The calibrator a search uses, and where it came from."""

    calibrator: MatchCalibrator | None
    stored: bool
    fresh: bool = True
    reason: str = ""


def _load(catalog: Catalog, path: Path) -> MatchCalibrator:
    model = MatchCalibrator.load(path)
    if model.coef_.shape[1] != len(EVIDENCE):
        raise ModelFileError(f"{path}: the stored match calibration reads other evidence than this catalens "
                             "(older version); it is fitted again")
    return model


def _freshness(model: MatchCalibrator, catalog: Catalog) -> str | None:
    """None while the calibration still describes the catalog: at most ``max_stale`` of it changed
    since the fit, and its evidence computed as then (the same modes, the same finetune run)."""
    read = getattr(model, "features_read_", None)
    if not read:
        return "the stored match calibration does not record the network it read (an older catalens)"
    if read != features_read(catalog):
        return "the network or the modes search reads changed since the match calibration was fitted (finetune)"
    fraction = model.changed_fraction(current_keys(catalog))
    if fraction > model.max_stale:
        return f"{100 * fraction:.0f}% of the catalog changed since the match calibration was fitted"
    return None


CALIBRATION = FittedSlot(
    name="match calibration", model_file=MODEL_FILE, load=_load,
    fit=lambda catalog, progress: fit_match_calibration(catalog, progress=progress), fresh=_freshness)


def match_calibration(catalog: Catalog) -> CalibrationState:
    """The last fitted calibrator, fresh or stale (never fitted here: the command that changed the
    catalog refits it, a server in the background). ``calibrator`` is None where none was ever
    fitted, or the catalog cannot be calibrated (fewer than two products...): searches then carry
    no confidence."""
    state = CALIBRATION.current(catalog)
    return CalibrationState(state.model, state.stored, state.fresh, state.reason)


def annotate(catalog: Catalog, query: Query, mode: str, filter: ItemFilter | None, settings: SearchSettings,
             result: QueryResult, calibrator: MatchCalibrator,
             reference: tuple[np.ndarray, np.ndarray] | None = None) -> QueryResult:
    """``result`` with each hit's confidence and the query's ``match`` (None below the threshold).
    ``reference``: the query's top ``DEPTH`` (keys, scores), uncollapsed, where the search has them."""
    result.calibrated = True
    if not result.results:
        return result
    hits = result.results
    rows, keys, _ = ranked_evidence(catalog, query, mode, filter, settings, [hit.key for hit in hits],
                                    [hit.score for hit in hits], catalog_classifier(catalog), reference=reference)
    confidence = dict(zip(keys.tolist(), calibrator.predict_proba(mode, rows).tolist(), strict=True))
    result.results = [replace(hit, confidence=confidence.get(hit.key)) for hit in hits]
    threshold = settings.match_threshold if settings.match_threshold is not None else calibrator.threshold(mode)
    result.threshold = float(threshold)
    top = result.results[0]
    result.match = top.id if top.confidence is not None and top.confidence >= threshold else None
    return result
