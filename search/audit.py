"""The catalog's own mistakes: items filed under the wrong category, one photo under two ids, photos
that are not a product (``catalens audit``).

Everything is leave-one-out evidence from the rows the index already stores (no new pass over the
catalog's images): each item's neighbours and their categories in every global feature, a
prototype + k-NN classifier of the catalog that never saw the item (the few-shot classifier's
structure, in closed form: removing one item from its leaf's prototype and from the neighbour
lists costs nothing, where 2,700 refits of the classifier would take an hour), and the product
grouping where the catalog gives one. Each finding's ``score`` is a probability fitted on the
catalog itself: for misfiled items, a logistic regression of the evidence of items as filed
against the same items planted under another leaf (half a sister leaf), which costs nothing
because an item's leave-one-out evidence does not depend on its own label; for non-products, the
same against a few generated placeholders (blank, gradient, noise, printed lines) embedded once
with the index's own features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catalens.indexer.estimator import Estimator
from catalens.indexer.features import feature_spec, feature_weights, l2_normalise
from catalens.indexer.files import atomic_path
from catalens.indexer.stores import ItemRecord
from catalens.search.classify import aligned_rows, nearest_rows

log = logging.getLogger(__name__)

PROBLEMS = ("mislabelled", "duplicate", "not-a-product")
LEVEL_NAMES = ("top", "coarse", "leaf")
DISMISSED_FILE = "audit_dismissed.json"
PLACEHOLDERS_FILE = "audit_placeholders.npz"


@dataclass
class Finding:
    """One suspicious item: what is wrong, what it should be, how sure, and why."""

    id: str
    category: str
    problem: str
    suggested: str | None
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "problem": self.problem, "suggested": self.suggested,
                "score": round(float(self.score), 4), "evidence": self.evidence}


@dataclass
class AuditSettings:
    """How suspicious an item must be, and how much evidence is gathered."""

    n_neighbours: int = 10  # the k-NN vote and the neighbours shown
    shortlist: int = 50  # neighbours kept per item and feature
    # The share of misfiled items the scores assume before any evidence (the base rate of the
    # calibrated probability): catalogs that have been looked after hold a few percent.
    prior: float = 0.03
    min_score: float = 0.5  # findings below this probability are not listed
    passes: int = 2  # later passes read the neighbours' categories as the earlier pass corrected them
    # Two rows this close in every feature are one image (re-encoded at most); flagged whatever their categories.
    exact_similarity: float = 0.999
    # Closer than any two photos of the grocery catalog's different products (measured), so a pair this
    # close under two different categories is one photo filed twice (resized, cropped, re-encoded).
    near_similarity: float = 0.88
    near_colour_similarity: float = 0.97
    placeholder_prior: float = 0.01
    seed: int = 0


# --- what the audit reads


@dataclass
class CatalogRows:
    """The catalog's items with their stored global rows, aligned by position."""

    keys: np.ndarray
    records: list[ItemRecord]
    rows: dict[str, np.ndarray]  # feature -> (n, dim) L2-normalised
    weights: dict[str, float]  # the classification weights of those features
    ae_scores: np.ndarray | None = None

    @property
    def ids(self) -> list[str]:
        return [record.id for record in self.records]

    @property
    def categories(self) -> np.ndarray:
        return np.array([record.category for record in self.records], dtype=object).astype(str)

    def embedding(self) -> np.ndarray:
        """The classifier's space: each feature normalised and weighted, centred, normalised again."""
        stacked = np.hstack([self.weights[name] * self.rows[name] for name in self.weights]).astype(np.float32)
        return l2_normalise(l2_normalise(stacked) - l2_normalise(stacked).mean(axis=0))

    @classmethod
    def from_catalog(cls, catalog: Any) -> CatalogRows:
        specs = [feature_spec(name) for name in catalog.global_features()]
        weights = feature_weights(specs, "classify")
        if not weights:
            raise ValueError(f"{catalog.location}: this index has no global features to audit with")
        keys, rows = aligned_rows(catalog, weights)
        records_by_key = catalog.items.items(keys.tolist())
        keep = np.array([int(key) in records_by_key for key in keys], dtype=bool)
        keys = keys[keep]
        rows = {name: l2_normalise(value[keep]) for name, value in rows.items()}
        weights = {name: weights[name] for name in rows}
        ae_scores = None
        from catalens.indexer.features.autoencoder import SCORE_FEATURE

        stored = catalog.items.rows(SCORE_FEATURE, keys.tolist()) if catalog.items.row_count(SCORE_FEATURE) else {}
        if stored and all(int(key) in stored for key in keys):
            ae_scores = np.array([np.frombuffer(stored[int(key)], np.float32)[0] for key in keys], np.float64)
        return cls(keys, [records_by_key[int(key)] for key in keys], rows, weights, ae_scores)


def nearest(rows: np.ndarray, k: int, queries: np.ndarray | None = None, exclude_self: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """``nearest_rows``, each row leaving itself out by default: leave-one-out evidence."""
    return nearest_rows(rows, k, queries, exclude_self)


# --- category tree


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def disagreeing_level(filed: str, suggested: str) -> str:
    """The first level of the category path where two paths part: ``top``, ``coarse`` or ``leaf``
    (``level N`` in deeper trees)."""
    a, b = filed.split("/"), suggested.split("/")
    for depth in range(max(len(a), len(b))):
        if depth >= len(a) or depth >= len(b) or a[depth] != b[depth]:
            if depth == max(len(a), len(b)) - 1:
                return "leaf"
            return LEVEL_NAMES[depth] if depth < len(LEVEL_NAMES) - 1 else f"level {depth + 1}"
    return "none"


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


# --- leave-one-out classification


@dataclass
class LeaveOneOut:
    """Per item, the leaf probabilities of a prototype + k-NN classifier of the catalog without it."""

    leaves: np.ndarray  # leaf paths
    proba: np.ndarray  # (n, leaves)
    temperature: float


def leave_one_out(embedding: np.ndarray, labels: np.ndarray, leaves: np.ndarray, neighbours: np.ndarray,
                  neighbour_sims: np.ndarray, n_neighbours: int, knn_min_support: int = 3,
                  temperature: float | None = None) -> LeaveOneOut:
    """As ``HierarchicalFewShotClassifier.leaf_proba`` (prototype softmax averaged with a k-NN vote
    for leaves of ``knn_min_support`` items), with the item removed from its leaf's prototype and
    from its own neighbours: exactly the classifier fitted without it, less the linear model."""
    n, n_leaves = len(embedding), len(leaves)
    sums = np.zeros((n_leaves, embedding.shape[1]), np.float32)
    np.add.at(sums, labels, embedding)
    counts = np.bincount(labels, minlength=n_leaves)
    scores = embedding @ l2_normalise(sums).T
    own = sums[labels] - embedding
    own_norm = np.linalg.norm(own, axis=1)
    scores[np.arange(n), labels] = np.where(counts[labels] > 1, np.einsum("ij,ij->i", embedding, own) /
                                            np.maximum(own_norm, 1e-12), -1.0)
    if temperature is None:
        temperature = _fit_temperature(scores, labels, counts)
    proba = _softmax(scores / temperature)
    k = min(n_neighbours, neighbours.shape[1])
    weights = _softmax(neighbour_sims[:, :k].astype(np.float64) / temperature)
    votes = np.zeros_like(proba)
    np.add.at(votes, (np.arange(n)[:, None], labels[neighbours[:, :k]]), weights)
    # Leave-one-out support: the item's own leaf counts one item fewer.
    support = counts[None, :] - (np.arange(n_leaves)[None, :] == labels[:, None])
    mixed = np.where(support >= knn_min_support, 0.5 * (proba + votes), proba)
    mixed /= mixed.sum(axis=1, keepdims=True)
    return LeaveOneOut(leaves, mixed, temperature)


def _fit_temperature(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> float:
    usable = counts[labels] >= 2
    if usable.sum() < 2:
        return 0.05
    rows = np.flatnonzero(usable)
    best, best_nll = 0.05, np.inf
    for temperature in np.geomspace(0.005, 0.5, 30):
        probs = _softmax(scores[rows] / temperature)
        nll = -np.log(np.maximum(probs[np.arange(len(rows)), labels[rows]], 1e-12)).mean()
        if nll < best_nll:
            best, best_nll = float(temperature), nll
    return best


# --- a calibrated probability from a few evidence columns


class EvidenceModel(Estimator):
    """A logistic regression of "the finding is real" on standardised evidence columns, its base
    rate set to ``prior`` (the positives are planted, so their share in the fit says nothing)."""

    fit_hint = "fit it on the catalog's evidence (search.audit)"

    def __init__(self, prior: float = 0.03, C: float = 1.0):
        self.prior = prior
        self.C = C

    def fit(self, X: np.ndarray, y: np.ndarray) -> EvidenceModel:
        from sklearn.linear_model import LogisticRegression

        X, y = np.asarray(X, np.float64), np.asarray(y, bool)
        self.mean_ = X.mean(axis=0)
        self.scale_ = np.maximum(X.std(axis=0), 1e-9)
        balanced = np.where(y, 0.5 / max(y.sum(), 1), 0.5 / max((~y).sum(), 1)) * len(y)
        model = LogisticRegression(C=self.C, max_iter=2000).fit((X - self.mean_) / self.scale_, y,
                                                                 sample_weight=balanced)
        self.coef_ = model.coef_[0].astype(np.float64)
        # Fitted on balanced classes: move the intercept to the prior's odds.
        self.intercept_ = float(model.intercept_[0] + np.log(self.prior / (1 - self.prior)))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        self.check_is_fitted()
        return ((np.asarray(X, np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(real) per row."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.decision_function(X), -50, 50)))

    def _state(self) -> dict[str, Any]:
        return {"mean_": self.mean_, "scale_": self.scale_, "coef_": self.coef_, "intercept_": self.intercept_}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


# --- misfiled items


MISLABEL_EVIDENCE = ("log p(filed leaf)", "log p(best other leaf)", "log p(filed parent)",
                     "nearest in filed leaf - nearest elsewhere", "neighbours in filed leaf", "product mates elsewhere")


@dataclass
class NeighbourLists:
    """Per feature (and ``combined``), each item's nearest other items and their similarities."""

    positions: dict[str, np.ndarray]
    sims: dict[str, np.ndarray]


def _gap(positions: np.ndarray, sims: np.ndarray, labels: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Similarity of the nearest item filed under ``leaf[i]`` minus that of the nearest elsewhere;
    a leaf absent from the shortlist counts as the shortlist's last similarity."""
    inside = labels[positions] == leaf[:, None]
    floor = sims[:, -1]
    s_in = np.where(inside.any(axis=1), np.where(inside, sims, -np.inf).max(axis=1), floor)
    s_out = np.where((~inside).any(axis=1), np.where(~inside, sims, -np.inf).max(axis=1), floor)
    return s_in - s_out


def mislabel_evidence(loo: LeaveOneOut, neighbours: NeighbourLists, labels: np.ndarray, leaf: np.ndarray,
                      parents: np.ndarray, product_mates: list[np.ndarray], k: int) -> np.ndarray:
    """(n, columns) evidence that item i does *not* belong in leaf ``leaf[i]`` (its own or a planted one);
    ``labels`` are the catalog's (corrected) leaves of the neighbours."""
    n = len(leaf)
    rows = np.arange(n)
    p = loo.proba
    p_leaf = p[rows, leaf]
    others = p.copy()
    others[rows, leaf] = -1.0
    p_other = others.max(axis=1)
    same_parent = parents[None, :] == parents[leaf][:, None]
    p_parent = (p * same_parent).sum(axis=1)
    combined = neighbours.positions["combined"]
    gap = _gap(combined, neighbours.sims["combined"], labels, leaf)
    agree = (labels[combined[:, :k]] == leaf[:, None]).mean(axis=1)
    mates = np.array([(labels[m] != leaf[i]).mean() if len(m) else 0.0 for i, m in enumerate(product_mates)])
    # How close the item's nearest neighbour is at all: an isolated photo (a studio packshot among
    # shelf photos) has weak neighbours whatever its label, and its other columns mean less.
    isolation = neighbours.sims["combined"][:, 0]
    columns = [np.log(p_leaf + 1e-6), np.log(p_other + 1e-6), np.log(p_parent + 1e-6), gap, agree, mates,
               isolation, isolation * np.log(p_leaf + 1e-6), isolation * gap]
    for name in sorted(neighbours.positions):
        if name != "combined":
            columns.append(_gap(neighbours.positions[name], neighbours.sims[name], labels, leaf))
    return np.stack(columns, axis=1)


def _planted_leaves(labels: np.ndarray, leaves: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A wrong leaf per item: a sister leaf (same parent) for half of them where one exists, any other leaf else."""
    parents = np.array([parent_of(str(leaf)) for leaf in leaves])
    out = np.empty(len(labels), np.int64)
    for i, own in enumerate(labels):
        sisters = np.flatnonzero((parents == parents[own]) & (np.arange(len(leaves)) != own))
        if len(sisters) and rng.random() < 0.5:
            out[i] = rng.choice(sisters)
        else:
            other = rng.integers(len(leaves) - 1)
            out[i] = other + (other >= own)
    return out


# --- duplicates


def duplicate_pairs(data: CatalogRows, neighbours: NeighbourLists, settings: AuditSettings
                    ) -> list[tuple[int, int, float, bool]]:
    """(i, j, similarity, exact) for pairs of items that show one image: every stored feature at
    least ``exact_similarity`` (exact copies, flagged whatever their categories), or the main
    feature at least ``near_similarity`` and colour at least ``near_colour_similarity`` under two
    different categories (resized, cropped, re-encoded copies). On grocery, no two photos of
    different products reach 0.88 and 0.97 together; copies resized to half, cropped by 10% or
    re-encoded at JPEG q40 keep colour above 0.98 and deep above 0.86."""
    main = next(iter(data.weights))
    categories = data.categories
    pairs: dict[tuple[int, int], tuple[float, bool]] = {}
    positions, sims = neighbours.positions[main], neighbours.sims[main]
    for i in range(len(positions)):
        for j, sim in zip(positions[i], sims[i], strict=True):
            if sim < settings.near_similarity:
                break
            j = int(j)
            others = [float(data.rows[name][i] @ data.rows[name][j]) for name in data.rows if name != main]
            exact = sim >= settings.exact_similarity and all(o >= settings.exact_similarity for o in others)
            colour = min(others) if others else 1.0
            near = colour >= settings.near_colour_similarity and categories[i] != categories[j]
            if exact or near:
                pairs[(min(i, j), max(i, j))] = (float(sim), bool(exact))
    return [(i, j, sim, exact) for (i, j), (sim, exact) in pairs.items()]


def duplicate_score(similarity: float, exact: bool, settings: AuditSettings) -> float:
    """P(one image) of a pair: 1 for exact copies; for near ones, rising from 0.5 at
    ``near_similarity`` (measured on grocery: no two photos of different products were that close)."""
    if exact:
        return 0.999
    return float(1.0 / (1.0 + np.exp(-60.0 * (similarity - settings.near_similarity))))


# --- photos that are not a product


def placeholder_images(size: int = 256, seed: int = 0) -> list[tuple[str, Any]]:
    """What a broken or placeholder upload looks like: flat colours, gradients, noise, printed lines
    on paper, stripes. Generated, so that no catalog has to hold one."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for colour in [(255, 255, 255), (0, 0, 0), (128, 128, 128), (235, 225, 200), (200, 220, 240)]:
        out.append(("flat colour", Image.new("RGB", (size, size), colour)))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out.append(("gradient", Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, -1).astype(np.uint8))))
    out.append(("gradient", Image.fromarray(np.stack([np.tile(ramp[:, None], (1, size)), np.full((size, size), 90.0),
                                                      np.tile(ramp[::-1, None], (1, size))], -1).astype(np.uint8))))
    for _ in range(2):
        out.append(("noise", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))))
    out.append(("noise", Image.fromarray(np.repeat(rng.integers(0, 256, (size, size, 1), dtype=np.uint8), 3, -1))))
    for lines in (6, 14):
        page = Image.new("RGB", (size, size), (250, 250, 250))
        draw = ImageDraw.Draw(page)
        for row in range(lines):
            y = 12 + row * (size - 24) // lines
            x = 12
            while x < size - 20:
                width = int(rng.integers(8, 30))
                draw.rectangle((x, y, min(x + width, size - 12), y + 4), fill=(30, 30, 30))
                x += width + 6
        out.append(("printed page", page))
    for period in (6, 17):
        stripes = np.where((np.arange(size) // period) % 2 == 0, 20, 240).astype(np.uint8)
        out.append(("stripes", Image.fromarray(np.stack([np.tile(stripes, (size, 1))] * 3, -1))))
    checker = ((np.arange(size)[:, None] // 32 + np.arange(size)[None, :] // 32) % 2 * 255).astype(np.uint8)
    out.append(("checkerboard", Image.fromarray(np.stack([checker] * 3, -1))))
    return out


def placeholder_rows(catalog: Any, names: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The placeholders' rows in each of ``names``' features, embedded once and kept in the models folder."""
    from catalens.indexer.features import embed

    kinds_images = placeholder_images()
    kinds = [kind for kind, _ in kinds_images]
    digest = hashlib.sha256(json.dumps([catalog.config.backbone, catalog.config.input_scaling, sorted(names),
                                        len(kinds)]).encode()).hexdigest()[:16]
    path = Path(catalog.models_dir) / PLACEHOLDERS_FILE
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["digest"]) == digest and all(name in stored for name in names):
                return kinds, {name: stored[name] for name in names}
    except (OSError, KeyError, ValueError):
        pass
    images = [image for _, image in kinds_images]
    rows = {name: l2_normalise(np.asarray(embed(catalog.feature(name), images), np.float32)) for name in names}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, allow_pickle=False, digest=np.array(digest), **rows)
    except OSError as error:  # a read-only index embeds them again next time
        log.info("audit: could not keep the placeholders' rows (%s)", error)
    return kinds, rows


def colour_entropy(rows: np.ndarray) -> np.ndarray:
    """Entropy of each colour histogram: a blank or two-tone image has few colours, noise all of them."""
    p = np.maximum(rows, 0.0) ** 2  # rows are L2-normalised histograms: squares sum to one
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    return -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)


def product_evidence(data: CatalogRows, embedding: np.ndarray, prototypes: np.ndarray, neighbours: NeighbourLists,
                     queries: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(n, columns) evidence that a photo is not a product: how far it is from every leaf's
    prototype and from its nearest items, and how odd its colour spread is. ``queries``: rows of
    photos outside the catalog (the placeholders); else the catalog's own, leave-one-out."""
    k = 10
    if queries is None:
        own_embedding = embedding
        near_sims = neighbours.sims["combined"][:, :k]
        colour_rows = data.rows.get("colour")
    else:
        stacked = np.hstack([data.weights[name] * queries[name] for name in data.weights]).astype(np.float32)
        catalog_stacked = np.hstack([data.weights[name] * data.rows[name] for name in data.weights]).astype(np.float32)
        own_embedding = l2_normalise(l2_normalise(stacked) - l2_normalise(catalog_stacked).mean(axis=0))
        _, near_sims = nearest(embedding, k, queries=own_embedding, exclude_self=False)
        colour_rows = queries.get("colour")
    best_prototype = (own_embedding @ prototypes.T).max(axis=1)
    main = next(iter(data.weights))
    main_rows = data.rows[main] if queries is None else queries[main]
    main_centre = l2_normalise(data.rows[main].mean(axis=0, keepdims=True))[0]
    columns = [best_prototype, near_sims.mean(axis=1), near_sims[:, 0], main_rows @ main_centre]
    if colour_rows is not None:
        entropy = colour_entropy(colour_rows)
        reference = colour_entropy(data.rows["colour"])
        median, spread = np.median(reference), max(np.subtract(*np.percentile(reference, [75, 25])), 1e-6)
        columns.append(np.abs(entropy - median) / spread)
    return np.stack(columns, axis=1)


# --- dismissals


def item_digest(record: ItemRecord, data: CatalogRows, position: int) -> str:
    """What a dismissal holds on to: the item's image (file fingerprint and stored rows) and category."""
    digest = hashlib.sha256(f"{record.key}\n{record.fingerprint}\n{record.category}".encode())
    for name in sorted(data.rows):
        digest.update(np.ascontiguousarray(data.rows[name][position], np.float32).tobytes())
    return digest.hexdigest()[:32]


def read_dismissed(catalog: Any) -> dict[str, dict[str, Any]]:
    path = Path(catalog.models_dir) / DISMISSED_FILE
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def dismiss(catalog: Any, item_id: str) -> dict[str, Any]:
    """Record that a person looked at ``item_id``'s findings and found nothing wrong; they stay hidden
    until the item changes (its image or its category). ``KeyError`` when the catalog has no such item."""
    record = catalog.items.item_by_id(item_id)
    if record is None:
        raise KeyError(item_id)
    data = CatalogRows.from_catalog(catalog)
    positions = np.flatnonzero(data.keys == record.key)
    digest = item_digest(record, data, int(positions[0])) if len(positions) else record.fingerprint
    dismissed = read_dismissed(catalog)
    import time

    dismissed[item_id] = {"digest": digest, "at": time.time()}
    path = Path(catalog.models_dir) / DISMISSED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(dismissed, indent=1, sort_keys=True))
    return dismissed[item_id]


# --- the audit


@dataclass
class AuditReport:
    findings: list[Finding]
    items: int
    seconds: float
    dismissed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "seconds": round(self.seconds, 3), "dismissed": self.dismissed,
                "findings": [finding.to_json() for finding in self.findings]}


def audit(catalog: Any, settings: AuditSettings | None = None, progress: bool = False) -> AuditReport:
    """Every finding of the catalog, most probable first (dismissed ones left out)."""
    import time

    from tqdm import tqdm

    settings = settings or AuditSettings()
    started = time.perf_counter()
    steps = tqdm(total=5, desc="audit", unit="step", disable=not progress, leave=False)
    data = CatalogRows.from_catalog(catalog)
    n = len(data.keys)
    if n < 3:
        return AuditReport([], n, time.perf_counter() - started)
    rng = np.random.default_rng(settings.seed)
    categories = data.categories
    leaves, labels = np.unique(categories, return_inverse=True)
    parents_of_leaves = np.array([parent_of(str(leaf)) for leaf in leaves])
    embedding = data.embedding()
    positions, sims = {}, {}
    for name, rows in [("combined", embedding), *data.rows.items()]:
        positions[name], sims[name] = nearest(rows, settings.shortlist)
    neighbours = NeighbourLists(positions, sims)
    steps.update()

    products = [record.attributes.get("product") if isinstance(record.attributes, dict) else None
                for record in data.records]
    by_product: dict[str, list[int]] = {}
    for i, product in enumerate(products):
        if product not in (None, ""):
            by_product.setdefault(str(product), []).append(i)
    mates = [np.array([j for j in by_product.get(str(product), []) if j != i], np.int64)
             if product not in (None, "") else np.zeros(0, np.int64) for i, product in enumerate(products)]

    # Misfiled items. An item's leave-one-out evidence does not depend on its own label, so the
    # same items planted under another leaf are free positives to fit the probability on.
    current = labels.copy()
    loo = None
    mislabel_p = np.zeros(n)
    suggested = labels.copy()
    for _ in range(max(1, settings.passes)):
        loo = leave_one_out(embedding, current, leaves, positions["combined"], sims["combined"],
                            settings.n_neighbours, temperature=None if loo is None else loo.temperature)
        filed = mislabel_evidence(loo, neighbours, current, labels, parents_of_leaves, mates, settings.n_neighbours)
        planted_leaf = _planted_leaves(labels, leaves, rng)
        planted = mislabel_evidence(loo, neighbours, current, planted_leaf, parents_of_leaves, mates,
                                    settings.n_neighbours)
        model = EvidenceModel(prior=settings.prior).fit(np.vstack([filed, planted]),
                                                        np.r_[np.zeros(n, bool), np.ones(n, bool)])
        mislabel_p = model.predict_proba(filed)
        others = loo.proba.copy()
        others[np.arange(n), labels] = -1.0
        suggested = others.argmax(axis=1)
        # The next pass reads the items this one is sure of under the leaf they look like: a
        # misfiled photo no longer drags its own burst-mates' evidence toward its wrong leaf.
        current = np.where(mislabel_p >= 0.5, suggested, labels)
    steps.update()

    duplicates = duplicate_pairs(data, neighbours, settings)
    steps.update()

    # Photos that are not a product, against generated placeholders embedded with the same features.
    prototypes = np.zeros((len(leaves), embedding.shape[1]), np.float32)
    np.add.at(prototypes, labels, embedding)
    prototypes = l2_normalise(prototypes)
    catalog_x = product_evidence(data, embedding, prototypes, neighbours)
    loo_best = np.maximum(np.where(np.arange(len(leaves))[None, :] == labels[:, None], -1.0,
                                   embedding @ prototypes.T).max(axis=1), _own_loo(embedding, labels, len(leaves)))
    catalog_x[:, 0] = loo_best
    try:
        kinds, rows = placeholder_rows(catalog, list(data.weights))
        placeholder_x = product_evidence(data, embedding, prototypes, neighbours, queries=rows)
    except Exception as error:  # a backbone that cannot run here: the catalog's own spread only
        log.warning("audit: placeholders not embedded (%s); not-a-product scores use the catalog alone", error)
        kinds, placeholder_x = [], np.zeros((0, catalog_x.shape[1]))
    if data.ae_scores is not None:
        catalog_x = np.column_stack([catalog_x, data.ae_scores])
        placeholder_x = np.column_stack([placeholder_x, np.full(len(placeholder_x), np.quantile(data.ae_scores, 0.99))])
    if len(placeholder_x):
        odd = EvidenceModel(prior=settings.placeholder_prior, C=0.1).fit(
            np.vstack([catalog_x, placeholder_x]), np.r_[np.zeros(n, bool), np.ones(len(placeholder_x), bool)])
        product_p = odd.predict_proba(catalog_x)
        kind_of = nearest(l2_normalise(placeholder_x), 1, queries=l2_normalise(catalog_x), exclude_self=False)[0][:, 0]
    else:
        z = (catalog_x - catalog_x.mean(axis=0)) / np.maximum(catalog_x.std(axis=0), 1e-9)
        product_p = 1.0 / (1.0 + np.exp(-(-z[:, 0] - 3.0)))
        kind_of = None
    steps.update()

    findings = _findings(data, leaves, labels, suggested, mislabel_p, loo, neighbours, duplicates, product_p,
                         kinds, kind_of, settings)
    dismissed = read_dismissed(catalog)
    kept, hidden = [], 0
    position_of = {record.id: i for i, record in enumerate(data.records)}
    for finding in findings:
        mark = dismissed.get(finding.id)
        if mark and mark.get("digest") == item_digest(data.records[position_of[finding.id]], data,
                                                      position_of[finding.id]):
            hidden += 1
            continue
        kept.append(finding)
    steps.update()
    steps.close()
    return AuditReport(kept, n, time.perf_counter() - started, hidden)


def _own_loo(embedding: np.ndarray, labels: np.ndarray, n_leaves: int) -> np.ndarray:
    sums = np.zeros((n_leaves, embedding.shape[1]), np.float32)
    np.add.at(sums, labels, embedding)
    own = l2_normalise(sums[labels] - embedding)
    counts = np.bincount(labels, minlength=n_leaves)
    return np.where(counts[labels] > 1, np.einsum("ij,ij->i", embedding, own), -1.0)


def _findings(data: CatalogRows, leaves: np.ndarray, labels: np.ndarray, suggested: np.ndarray,
              mislabel_p: np.ndarray, loo: LeaveOneOut, neighbours: NeighbourLists,
              duplicates: list[tuple[int, int, float, bool]], product_p: np.ndarray, kinds: list[str],
              kind_of: np.ndarray | None, settings: AuditSettings) -> list[Finding]:
    """Findings of at least ``min_score``. An item that is surely (0.5) one problem is not listed under
    the others: a placeholder filed under a leaf is no
    misfiled product)."""
    ids, categories = data.ids, data.categories
    k = settings.n_neighbours
    combined = neighbours.positions["combined"]

    def neighbour_list(i: int) -> list[dict[str, Any]]:
        return [{"id": ids[j], "category": categories[j], "similarity": round(float(s), 4)}
                for j, s in zip(combined[i, :k], neighbours.sims["combined"][i, :k], strict=True)]

    taken: dict[int, Finding] = {}
    listed: list[Finding] = []
    for i in np.flatnonzero(product_p >= settings.min_score):
        evidence: dict[str, Any] = {"nearest_similarity": round(float(neighbours.sims["combined"][i, 0]), 4),
                                    "neighbours": neighbour_list(i)}
        if kind_of is not None:
            evidence["looks_like"] = kinds[int(kind_of[i])]
        if data.ae_scores is not None:
            evidence["reconstruction_error"] = round(float(data.ae_scores[i]), 4)
        listed.append(Finding(ids[i], categories[i], "not-a-product", None, float(product_p[i]), evidence))
        if product_p[i] >= 0.5:
            taken[i] = listed[-1]
    duplicate_of: dict[int, Finding] = {}
    for i, j, sim, exact in sorted(duplicates, key=lambda pair: -pair[2]):
        # The copy is the one that fits its category worse (the later key between equals); both are named.
        later = (j, i) if data.keys[j] > data.keys[i] else (i, j)
        copy, original = (i, j) if mislabel_p[i] > mislabel_p[j] else (j, i) if mislabel_p[j] > mislabel_p[i] else later
        if copy in duplicate_of:
            duplicate_of[copy].evidence["ids"].append(ids[original])
            duplicate_of[copy].evidence["categories"].append(categories[original])
            continue
        if copy in taken:
            continue
        evidence = {"ids": [ids[original]], "categories": [categories[original]], "similarity": round(sim, 4),
                    "exact": exact, "neighbours": neighbour_list(copy)}
        same = categories[copy] == categories[original]
        duplicate_of[copy] = Finding(ids[copy], categories[copy], "duplicate", None if same else categories[original],
                                     duplicate_score(sim, exact, settings), evidence)
        listed.append(duplicate_of[copy])
    for i in np.flatnonzero(mislabel_p >= settings.min_score):
        # A copy under another category is listed under both problems: which photo is the right one is
        # for a person to say. A non-product has no category to suggest.
        if i in taken and taken[i].problem == "not-a-product":
            continue
        leaf = str(leaves[suggested[i]])
        p = loo.proba[i]
        evidence = {"level": disagreeing_level(categories[i], leaf),
                    "p_filed": round(float(p[labels[i]]), 4), "p_suggested": round(float(p[suggested[i]]), 4),
                    "neighbours": neighbour_list(i)}
        for name in data.rows:
            own = neighbours.positions[name][i, :k]
            evidence[f"{name}_neighbours_in_filed_leaf"] = int((labels[own] == labels[i]).sum())
        listed.append(Finding(ids[i], categories[i], "mislabelled", leaf, float(mislabel_p[i]), evidence))
    return sorted(listed, key=lambda finding: -finding.score)


def select(findings: Sequence[Finding], category: str | None = None, problem: str | None = None,
           top: int | None = None) -> list[Finding]:
    """The findings under a category prefix of whole levels and of one problem, the first ``top``."""
    out = [finding for finding in findings
           if (not category or finding.category == category or finding.category.startswith(category + "/"))
           and (not problem or finding.problem == problem)]
    return out[:top] if top else out


__all__ = ["AuditReport", "AuditSettings", "Finding", "PROBLEMS", "audit", "dismiss", "select"]
