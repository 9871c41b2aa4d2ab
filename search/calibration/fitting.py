"""Fitting the match calibration on the catalog itself (``fit_match_calibration``): what runs only
when the catalog changes, never in a search.

The calibration is fitted on held-out queries made from the catalog's own items, searched against
the rest of it in every mode. An item of a product with other photos is searched from its stored
rows against the catalog without it and its near-duplicates (burst shots of one session are no
shop photo); a product with one image is searched with an augmented view of it; and a share of
queries has its whole product held out, since shop photos of products the catalog does not sell
must get a low confidence too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from catalens.indexer.features import l2_normalise
from catalens.indexer.stores import ItemFilter, ItemRecord, product_of, stack_rows
from catalens.search.calibration.evidence import EVIDENCE, ranked_evidence
from catalens.search.calibration.model import CalibrationError, MatchCalibrator
from catalens.search.query import Query
from catalens.search.ranking import available_modes, search_weights
from catalens.search.settings import SearchSettings

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

# A held-out photo is searched without its product's photos this close to it (first global
# feature's cosine): photos of one shooting session, which a shop's photo never is. Higher left
# the calibration queries easier than shop photos and the confidences too high; lower, its right
# answers thin out (docs/confidence.md, "The calibration's held-out photos made harder").
NEAR_DUPLICATE = 0.8


@dataclass
class CalibrationQuery:
    query: Query
    product: str
    filter: ItemFilter | None
    kind: str  # "held-out photo", "augmented view" or "absent product"
    held_out: tuple[int, ...] = ()  # items of its product the search cannot see (a held-out photo's twins)
    absent_leaf: str | None = None  # an absent product's category, hidden from the classifier


def _stored_query(catalog: Catalog, record: ItemRecord) -> Query | None:
    """A query holding the item's stored rows as if extracted from its photo (no decoding), or None
    where the item lacks a row of some feature."""
    dims = catalog.dims()
    vectors, descriptors = {}, {}
    for name in catalog.global_features():
        blob = catalog.items.rows(name, [record.key]).get(record.key)
        if blob is None:
            return None
        vectors[name] = l2_normalise(np.frombuffer(blob, np.float32).reshape(1, dims[name]))[0]
    for name in catalog.local_features():
        blob = catalog.items.rows(name, [record.key]).get(record.key)
        if blob is None:
            return None
        descriptors[name] = catalog.feature(name).decode(blob)
    query = Query(Image.new("RGB", (1, 1)), record.id)
    query.preset(catalog, vectors, descriptors)
    return query


def _augmented_query(record: ItemRecord, rng: np.random.Generator) -> Query | None:
    from catalens.indexer.imageio import load_query
    from catalens.indexer.training.augment import photo_view

    try:
        image = load_query(record.image)
    except Exception as error:  # noqa: BLE001 - any unreadable image is skipped, with its reason
        log.info("calibration: %s: cannot read %s (%s); skipped", record.id, record.image, error)
        return None
    return Query(photo_view(rng, image), f"{record.id} (augmented)")


def calibration_queries(catalog: Catalog, max_queries: int = 240, absent_fraction: float = 0.2,
                        near_duplicate: float = NEAR_DUPLICATE, seed: int = 0,
                        only_untrained: bool = True) -> list[CalibrationQuery]:
    """Held-out queries from the catalog's items, products in turn (each product about as often).

    ``only_untrained``: after ``finetune``, ask only items the adapted network never trained on
    (False: any item, as before; ``benchmarks/bench_confidence.py --paired`` compares the two).

    ``absent_fraction`` of them hold their whole product out; ``near_duplicate`` is the cosine
    (first global feature) above which another photo of the product counts as the same shot."""
    records = list(catalog.items.records().values())
    by_product: dict[str, list[ItemRecord]] = {}
    for record in records:
        by_product.setdefault(product_of(record), []).append(record)
    if len(by_product) < 2:
        raise CalibrationError(f"{catalog.location}: calibration needs at least 2 products, the index has {len(by_product)}")
    all_keys = np.array(sorted(record.key for record in records), np.int64)
    globals_ = catalog.global_features()
    vectors: dict[int, np.ndarray] = {}
    if globals_:
        found, rows = stack_rows(catalog.items.rows(globals_[0]), catalog.dims()[globals_[0]])
        vectors = dict(zip(found.tolist(), l2_normalise(rows), strict=True))
    rng = np.random.default_rng(seed)
    products = sorted(by_product)
    n = min(max_queries, 2 * len(records))  # a tiny catalog needs few, and a search may be waiting
    # Where search uses the adapted network, only photos it never trained on are fair queries: it
    # names the photos it learnt surer than it will ever name a shop's (a product none of whose
    # photos was held out is asked with an augmented view).
    untrained = _untrained_keys(catalog) if only_untrained else None
    queries: list[CalibrationQuery] = []
    order: list[str] = []
    while len(order) < n:
        order += list(rng.permutation(products))
    turn: dict[str, int] = {}
    for product in order[:n]:
        members = by_product[product]
        askable = members if untrained is None else [m for m in members if m.key in untrained]
        if not askable:
            query = _augmented_query(members[int(rng.integers(len(members)))], rng)
            if query is not None:
                queries.append(CalibrationQuery(query, product, None, "augmented view"))
            continue
        # Each product's askable photos in turn, so repeated turns ask other photos.
        if product not in turn:
            turn[product] = int(rng.integers(len(askable)))
        record = askable[turn[product] % len(askable)]
        turn[product] += 1
        if rng.random() < absent_fraction:
            keep = np.setdiff1d(all_keys, [m.key for m in members], assume_unique=True)
            query = _stored_query(catalog, record)
            if query is not None:
                queries.append(CalibrationQuery(query, product, ItemFilter(keys=keep), "absent product",
                                                absent_leaf=record.category))
            continue
        own = vectors.get(record.key)
        twins = [m.key for m in members if m.key == record.key or own is None or m.key not in vectors
                 or float(vectors[m.key] @ own) >= near_duplicate]
        if len(twins) < len(members):
            query = _stored_query(catalog, record)
            keep = np.setdiff1d(all_keys, twins, assume_unique=True)
            if query is not None:
                queries.append(CalibrationQuery(query, product, ItemFilter(keys=keep), "held-out photo",
                                                held_out=tuple(twins)))
        else:
            query = _augmented_query(record, rng)
            if query is not None:
                queries.append(CalibrationQuery(query, product, None, "augmented view"))
    return queries


def _untrained_keys(catalog: Catalog) -> set[int] | None:
    """Keys of the items the adapted network that search uses never trained on (its held-out slice,
    items added since), or None where search uses no adapted network: every stored row is then as
    fair a query as any other."""
    from catalens.indexer.features.deep_ft import trained_keys

    trained = trained_keys(catalog)
    if trained is None:
        return None
    return set(np.setdiff1d(current_keys(catalog), trained).tolist())


def current_keys(catalog: Catalog) -> np.ndarray:
    """Every item key of the catalog now (cached until it is written)."""
    return catalog.cached("item_keys", lambda: np.array(
        [record.key for record in catalog.items.records().values()], np.int64))


def features_read(catalog: Catalog) -> str:
    """A digest of what computes the evidence a calibration reads: the modes the catalog answers,
    their default weights in fused search, and the run of ``finetune`` that made its ``deep_ft``
    rows. A second finetune replaces every one of those rows without adding or removing an item,
    one that keeps no network gives fused search back to ``deep``, and a catalog of packshots that
    gains shop photos weighs SIFT as other catalogs do (``ranking.is_packshot_catalog``): a
    calibration fitted before any of these describes another search."""
    state = {"modes": available_modes(catalog), "weights": search_weights(catalog, SearchSettings()),
             "adaptation": catalog.meta.get("adaptation")}
    # As the index's JSON stores it: a numpy number just computed must digest as the one read back.
    text = json.dumps(state, sort_keys=True, default=lambda value: value.item() if hasattr(value, "item") else str(value))
    return hashlib.sha256(text.encode()).hexdigest()


ROWS_PER_QUERY = 5  # the top hits of each calibration query the model learns from


def calibration_evidence(catalog: Catalog, queries: Sequence[CalibrationQuery], modes: Sequence[str],
                         settings: SearchSettings | None = None,
                         progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per mode, (evidence rows, right, is_top) of the top ``ROWS_PER_QUERY`` hits of each query.

    The classifier is refitted without the held-out photos (and their twins): one that had learnt
    them would vouch for them as it never can for a shop's photo."""
    from tqdm import tqdm

    from catalens.search.classify import fit_classifier_without

    settings = settings or SearchSettings()
    try:
        classifier = fit_classifier_without(catalog, sorted({key for q in queries for key in q.held_out}))
    except ValueError:  # nothing to classify with, or every item held out (a tiny catalog): the
        classifier = None  # category evidence stays constant, unused
    out: dict[str, tuple[list, list, list]] = {mode: ([], [], []) for mode in modes}
    for calibration in tqdm(queries, desc="calibrating", unit="query", disable=not progress, dynamic_ncols=True):
        for mode in modes:
            rows, _, products = ranked_evidence(catalog, calibration.query, mode, calibration.filter, settings,
                                                classifier=classifier, absent_leaf=calibration.absent_leaf)
            rows, products = rows[:ROWS_PER_QUERY], products[:ROWS_PER_QUERY]
            out[mode][0].append(rows)
            out[mode][1].extend(product == calibration.product for product in products)
            out[mode][2].extend(i == 0 for i in range(len(products)))
    return {mode: (np.vstack(rows) if rows else np.zeros((0, len(EVIDENCE))), np.asarray(right, bool), np.asarray(top, bool))
            for mode, (rows, right, top) in out.items()}


def fit_match_calibration(catalog: Catalog, settings: SearchSettings | None = None, max_queries: int = 240,
                          seed: int = 0, calibrator: MatchCalibrator | None = None,
                          progress: bool = False, only_untrained: bool = True) -> MatchCalibrator:
    """A ``MatchCalibrator`` fitted on held-out queries made from ``catalog``'s items, every mode it
    answers; ``progress``: a progress bar over the queries."""
    started = time.perf_counter()
    queries = calibration_queries(catalog, max_queries=max_queries, seed=seed, only_untrained=only_untrained)
    evidence = calibration_evidence(catalog, queries, available_modes(catalog), settings, progress=progress)
    keys = np.array([record.key for record in catalog.items.records().values()], np.int64)
    model = (calibrator or MatchCalibrator()).fit(evidence, keys, features_read(catalog))
    log.info("match calibration fitted on %d held-out queries (%s) in %.1fs", len(queries),
             ", ".join(f"{sum(q.kind == kind for q in queries)} {kind}" for kind in
                       ("held-out photo", "augmented view", "absent product")), time.perf_counter() - started)
    return model

