"""Calibrated match confidence: how likely a result shows the query's product, per search mode.

Raw scores live on a different scale in every mode (cosine, fused sums, inlier counts) and
barely separate right answers from wrong ones. A ``MatchCalibrator`` turns the evidence of one
result into a probability with a logistic regression per mode, over four numbers that predict
correctness (``EVIDENCE``): its score, its margin to the best item of another product, its
verified inliers, how many of the nearest results show its product, and the probability the
catalog's classifier (``search.classify``) gives its leaf category.

It is fitted on the catalog itself (``fit_match_calibration``): held-out queries made from the
catalog's own items, searched against the rest of it in every mode. An item of a product with
other photos is searched from its stored rows against the catalog without it and its
near-duplicates (burst shots of one session are no shop photo); a product with one image is
searched with an augmented view of it; and a share of queries has its whole product held out,
since shop photos of products the catalog does not sell must get a low confidence too. The
default match threshold is the lowest confidence at which the calibration queries' top results
reach ``target_precision``. The model is stored with the index (``MODEL_FILE``) through the
``CALIBRATION`` slot (``indexer.fitted``): a search uses the last fit, never fits one; it counts as
stale once the catalog has changed by more than ``max_stale``, and whoever changed the catalog
refits it (``search.refit``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from catalens.indexer.estimator import Estimator, ModelFileError
from catalens.indexer.features import feature_spec, l2_normalise
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.stores import ItemFilter, ItemRecord, product_of, stack_rows
from catalens.search.query import Query, QueryResult
from catalens.search.ranking import available_modes, rank_products
from catalens.search.settings import SearchSettings

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.classify import FittedClassifier

log = logging.getLogger(__name__)

MODEL_FILE = "match_calibration.pt"
EVIDENCE = ("score", "margin", "inliers", "agreement", "category")
# Evidence is read from this many results, whatever k the caller asked: a result's confidence
# does not depend on how many results are shown.
DEPTH = 20
AGREEMENT_OF = 10  # "how many of the nearest results show its product" counts this many
# A held-out photo is searched without its product's photos this close to it (first global
# feature's cosine): photos of one shooting session, which a shop's photo never is. Higher left
# the calibration queries easier than shop photos and the confidences too high; lower, its right
# answers thin out (docs/confidence.md, "The calibration's held-out photos made harder").
NEAR_DUPLICATE = 0.8


class CalibrationError(ValueError):
    """A catalog on which no calibration can be fitted (too few items or products); the message says why."""


# --- evidence of one ranked list


def _is_local(mode: str) -> bool:
    return mode == "local" or (mode != "fused" and feature_spec(mode).kind == "local")


def _scale(mode: str, scores: np.ndarray) -> np.ndarray:
    """Local scores are inlier counts (tens to hundreds): their logarithm is what adds evidence linearly."""
    scores = np.asarray(scores, np.float64)
    return np.log1p(np.maximum(scores, 0.0)) if _is_local(mode) else scores


def hit_evidence(mode: str, scores: np.ndarray, products: Sequence[str], inliers: np.ndarray,
                 reference_scores: np.ndarray, reference_products: Sequence[str], inlier_cap: int,
                 category_proba: np.ndarray | None = None) -> np.ndarray:
    """(n, len(EVIDENCE)) evidence of hits (``scores``, ``products``, best verified ``inliers``, the
    classifier's probability of each one's category) against the ranked ``reference`` list they
    come from (best first)."""
    scaled = _scale(mode, scores)
    reference = _scale(mode, reference_scores)
    reference_products = np.asarray(list(reference_products), dtype=object)
    top = reference_products[:AGREEMENT_OF]
    rows = np.zeros((len(scaled), len(EVIDENCE)), np.float64)
    for i, (score, product) in enumerate(zip(scaled, products, strict=True)):
        others = reference[reference_products != product]
        rows[i, 0] = score
        rows[i, 1] = score - (others.max() if len(others) else 0.0)
        rows[i, 2] = min(float(inliers[i]), inlier_cap) / inlier_cap
        rows[i, 3] = float(np.sum(top == product)) / max(len(top), 1)
    # Log-probability: a classifier's certainty adds up in odds, not in probability.
    rows[:, 4] = np.log(np.maximum(category_proba if category_proba is not None else np.ones(len(rows)), 1e-4))
    return rows


def category_probabilities(catalog: Catalog, query: Query, fitted: FittedClassifier | None,
                           absent_leaf: str | None = None) -> dict[str, float]:
    """The classifier's probability of each leaf category for this query, ``absent_leaf`` left out
    (``FittedClassifier.leaf_probabilities``); empty without a classifier."""
    if fitted is None:
        return {}
    return query.leaf_probabilities(catalog, fitted, absent_leaf)


def catalog_classifier(catalog: Catalog) -> FittedClassifier | None:
    """The catalog's last fitted classifier, or None where it has none (no features to classify with,
    or none fitted yet)."""
    from catalens.search.classify import fitted_classifier

    try:
        return fitted_classifier(catalog)
    except ValueError:
        return None


def _verified_inliers(catalog: Catalog, query: Query, mode: str, keys: Sequence[int]) -> np.ndarray:
    """Best inliers of each key over the local features, as far as this mode verified it (0 otherwise).

    Only modes that verify read them: what another mode verified on the same query earlier must
    not change this mode's confidence."""
    out = np.zeros(len(keys), np.float64)
    if mode != "fused" and not _is_local(mode):
        return out
    features = catalog.local_features() if mode in ("fused", "local") else [mode]
    for feature in features:
        checks = query.verifications(catalog, feature)
        for i, key in enumerate(keys):
            check = checks.get(int(key))
            if check is not None:
                out[i] = max(out[i], check.inliers)
    return out


def ranked_evidence(catalog: Catalog, query: Query, mode: str, filter: ItemFilter | None,
                    settings: SearchSettings, keys: Sequence[int] | None = None,
                    scores: Sequence[float] | None = None, classifier: FittedClassifier | None = None,
                    absent_leaf: str | None = None,
                    reference: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(evidence rows, keys, products) of ``keys``/``scores`` (default: the top ``DEPTH`` results)
    against this query's top ``DEPTH`` results in ``mode``, every photo of a product counted,
    uncollapsed (``reference``, where the caller has ranked them already)."""
    reference_keys, reference_scores = reference if reference is not None else \
        rank_products(catalog, query, mode, DEPTH, filter, settings.merged(collapse=False))
    if keys is None:
        keys, scores = reference_keys, reference_scores
    keys = [int(key) for key in keys]
    records = catalog.items.items([*keys, *reference_keys.tolist()])
    reference_products = [product_of(records[int(key)]) for key in reference_keys if int(key) in records]
    reference_scores = np.asarray([s for key, s in zip(reference_keys, reference_scores, strict=True) if int(key) in records])
    kept = [i for i, key in enumerate(keys) if key in records]
    keys = [keys[i] for i in kept]
    products = [product_of(records[key]) for key in keys]
    leaf_proba = category_probabilities(catalog, query, classifier, absent_leaf)
    rows = hit_evidence(mode, np.asarray([scores[i] for i in kept]), products,
                        _verified_inliers(catalog, query, mode, keys), reference_scores, reference_products,
                        settings.inlier_cap, np.array([leaf_proba.get(records[key].category, 0.0) for key in keys])
                        if leaf_proba else None)
    return rows, np.asarray(keys, np.int64), products


# --- the model


class MatchCalibrator(Estimator):
    """Per mode, a logistic regression from a result's evidence to P(same product as the query).

    Hyper-parameters:
      target_precision  the default match threshold is the lowest confidence at which the
                        calibration queries' top results are right this often
      C                 inverse regularisation of the logistic regressions
      max_stale         share of the catalog (items added plus removed, over the items at fit
                        time) that may change before the model counts as stale

    Every coefficient is kept >= 0 (a feature that comes out negative is dropped and the model
    refitted), so a confidence never falls when a result's evidence grows.
    """

    fit_hint = "run 'catalens calibrate'"

    def __init__(self, target_precision: float = 0.95, C: float = 1.0, max_stale: float = 0.2):
        self.target_precision = target_precision
        self.C = C
        self.max_stale = max_stale

    def fit(self, evidence: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
            catalog_keys: np.ndarray) -> MatchCalibrator:
        """``evidence[mode] = (rows (n, len(EVIDENCE)), right (n,) bool, is_top (n,) bool)``:
        hits of calibration queries, whether each shows the query's product, whether it was the top hit."""
        from sklearn.linear_model import LogisticRegression

        modes, coefs, intercepts, thresholds, precisions, coverages, counts = [], [], [], [], [], [], []
        for mode, (rows, right, is_top) in evidence.items():
            rows, right, is_top = np.asarray(rows, np.float64), np.asarray(right, bool), np.asarray(is_top, bool)
            if not len(rows):  # no held-out query found anything in this mode: no evidence either way
                rows = np.zeros((0, len(EVIDENCE)))
            mean, std = (rows.mean(axis=0), rows.std(axis=0)) if len(rows) else (np.zeros(len(EVIDENCE)),) * 2
            active = std > 1e-9
            std[~active] = 1.0
            coef = np.zeros(rows.shape[1])
            # With one kind of answer only, or no evidence that varies, the rate of right answers
            # (with a pseudo-count each way) is all there is to say.
            intercept = float(np.log((right.sum() + 1) / (len(right) - right.sum() + 1)))
            if not len(rows) or right.all() or not right.any() or not active.any():
                log.info("calibration: mode %s has one kind of answer or no varying evidence; its confidence "
                         "is the rate of right answers", mode)
            else:
                while True:
                    model = LogisticRegression(C=self.C, max_iter=1000)
                    model.fit(((rows - mean) / std)[:, active], right)
                    coef = np.zeros(rows.shape[1])
                    coef[active] = model.coef_[0] / std[active]
                    if (coef >= 0).all() or (active & (coef > 0)).sum() == 0:
                        break
                    active &= coef > 0
                if (coef >= 0).all():
                    intercept = float(model.intercept_[0] - np.dot(model.coef_[0], mean[active] / std[active]))
                else:  # the last feature left speaks against itself: no usable evidence
                    coef = np.zeros(rows.shape[1])
            confidence = _sigmoid(rows @ coef + intercept)
            threshold, precision, coverage = _threshold(confidence[is_top], right[is_top], self.target_precision)
            modes.append(mode)
            coefs.append(coef)
            intercepts.append(intercept)
            thresholds.append(threshold)
            precisions.append(precision)
            coverages.append(coverage)
            counts.append(int(is_top.sum()))
        if not modes:
            raise CalibrationError("no held-out query could be searched")
        self.modes_ = np.asarray(modes, dtype=str)
        self.coef_ = np.asarray(coefs, np.float64)
        self.intercept_ = np.asarray(intercepts, np.float64)
        self.threshold_ = np.asarray(thresholds, np.float64)
        self.precision_ = np.asarray(precisions, np.float64)
        self.coverage_ = np.asarray(coverages, np.float64)
        self.queries_ = np.asarray(counts, np.int64)
        self.catalog_keys_ = np.unique(np.asarray(catalog_keys, np.int64))
        self.fitted_at_ = float(time.time())
        return self

    def modes(self) -> list[str]:
        self.check_is_fitted()
        return [str(mode) for mode in self.modes_]

    def _row(self, mode: str) -> int:
        self.check_is_fitted()
        found = np.flatnonzero(self.modes_ == mode)
        if not len(found):
            raise KeyError(f"mode {mode!r} is not calibrated (calibrated: {', '.join(self.modes())})")
        return int(found[0])

    def predict_proba(self, mode: str, evidence: np.ndarray) -> np.ndarray:
        """P(same product) of each evidence row, in [0, 1]."""
        row = self._row(mode)
        return _sigmoid(np.asarray(evidence, np.float64).reshape(-1, len(EVIDENCE)) @ self.coef_[row] + self.intercept_[row])

    def threshold(self, mode: str) -> float:
        """The default match threshold of ``mode``."""
        return float(self.threshold_[self._row(mode)])

    def changed_fraction(self, current_keys: np.ndarray) -> float:
        """Items added plus removed since the fit, over the items at fit time."""
        self.check_is_fitted()
        current = np.unique(np.asarray(current_keys, np.int64))
        changed = len(np.setxor1d(current, self.catalog_keys_, assume_unique=True))
        return changed / max(len(self.catalog_keys_), 1)

    def summary(self) -> list[dict[str, Any]]:
        """Per mode: threshold, and the precision and coverage of ``match`` on the calibration queries."""
        self.check_is_fitted()
        return [{"mode": str(mode), "queries": int(n), "threshold": round(float(t), 4),
                 "precision": round(float(p), 4), "coverage": round(float(c), 4)}
                for mode, n, t, p, c in zip(self.modes_, self.queries_, self.threshold_, self.precision_,
                                             self.coverage_, strict=True)]

    def _state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("modes_", "coef_", "intercept_", "threshold_", "precision_", "coverage_", "queries_",
                 "catalog_keys_", "fitted_at_")}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _threshold(confidence: np.ndarray, right: np.ndarray, target: float) -> tuple[float, float, float]:
    """(lowest threshold whose matches are right ``target`` of the time, their precision, coverage).

    No threshold reaching the target gives 1.0: no confident match, rather than wrong ones."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(right[order])
    precision = hits / np.arange(1, len(order) + 1)
    reach = np.flatnonzero(precision >= target)
    if not len(reach):
        return 1.0, 0.0, 0.0
    last = int(reach[-1])
    # Ties: every query with the threshold's confidence matches, so count them all.
    threshold = float(confidence[order][last])
    matched = confidence >= threshold
    return threshold, float(right[matched].mean()), float(matched.mean())


# --- held-out queries made from the catalog's own items


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
    model = (calibrator or MatchCalibrator()).fit(evidence, keys)
    log.info("match calibration fitted on %d held-out queries (%s) in %.1fs", len(queries),
             ", ".join(f"{sum(q.kind == kind for q in queries)} {kind}" for kind in
                       ("held-out photo", "augmented view", "absent product")), time.perf_counter() - started)
    return model


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


def current_keys(catalog: Catalog) -> np.ndarray:
    """Every item key of the catalog now (cached until it is written)."""
    return catalog.cached("item_keys", lambda: np.array(
        [record.key for record in catalog.items.records().values()], np.int64))


def _load(catalog: Catalog, path: Path) -> MatchCalibrator:
    model = MatchCalibrator.load(path)
    if model.coef_.shape[1] != len(EVIDENCE):
        raise ModelFileError(f"{path}: the stored match calibration reads other evidence than this catalens "
                             "(older version); it is fitted again")
    return model


def _freshness(model: MatchCalibrator, catalog: Catalog) -> str | None:
    """None while the calibration still describes the catalog: at most ``max_stale`` of it changed
    since the fit, and every mode it answers calibrated."""
    fraction = model.changed_fraction(current_keys(catalog))
    if fraction > model.max_stale:
        return f"{100 * fraction:.0f}% of the catalog changed since the match calibration was fitted"
    if not set(available_modes(catalog)) <= set(model.modes()):
        return "the match calibration does not cover every mode of the index"
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
