"""A metric-learning projection head trained on the catalog's frozen deep vectors (``catalens finetune``).

The head (linear, ReLU, linear, L2) is trained with a triplet loss on batch-hard triplets
(P categories x K items per batch, hardest positive and hardest negative per anchor), the
recipe of one-shot face recognition, on the CPU. ``fit_projection`` first checks on a held-out
part of the catalog whether the head finds products better than the raw vectors, and keeps it
only where it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from catalens.indexer.estimator import Estimator
from catalens.indexer.features import l2_normalise
from catalens.indexer.stores import vectors_of
from catalens.indexer.training.networks import ProjectionHead

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

HEAD_FEATURE = "deep_head"
HEAD_FILE = "deep_head_projection.pt"


class TripletProjection(Estimator):
    """``fit(features, categories)`` trains the head, ``transform`` applies it."""

    fit_hint = "run 'catalens finetune' on the index"

    def __init__(
        self,
        out_dim: int = 256,
        hidden: int = 512,
        margin: float = 0.2,
        steps: int = 300,
        classes_per_batch: int = 32,
        per_class: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
        threads: int = 1,
    ):
        self.out_dim = out_dim
        self.hidden = hidden
        self.margin = margin
        self.steps = steps
        self.classes_per_batch = classes_per_batch
        self.per_class = per_class
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.threads = threads

    def _prepare(self, features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(l2_normalise(l2_normalise(features) - self.mean_))

    def fit(self, features: np.ndarray, categories: Sequence[str]) -> TripletProjection:
        features = np.asarray(features, dtype=np.float32)
        labels_text, labels = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
        self.mean_ = l2_normalise(features).mean(axis=0)
        x = self._prepare(features)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.head_ = ProjectionHead(x.shape[1], self.hidden, self.out_dim)
        optimiser = torch.optim.AdamW(self.head_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        members = [np.flatnonzero(labels == c) for c in range(len(labels_text))]
        # Anchors need a positive, so only categories with two or more items are drawn as anchors;
        # singletons still serve as negatives through the random extra rows.
        anchors = [c for c, rows in enumerate(members) if len(rows) >= 2]
        self.losses_: list[float] = []
        if not anchors:
            log.warning("no category has two items: the projection head stays untrained")
            self.head_.eval()
            return self
        labels_t = torch.from_numpy(labels.astype(np.int64))
        # Batches are small: one thread trained 3x faster than two on the 2-core dev machine.
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._train(x, labels, labels_t, members, anchors, optimiser, rng)
        finally:
            torch.set_num_threads(previous_threads)
        self.head_.eval()
        return self

    def _train(self, x, labels, labels_t, members, anchors, optimiser, rng) -> None:
        self.head_.train()
        for _step in range(self.steps):
            chosen = rng.choice(anchors, min(self.classes_per_batch, len(anchors)), replace=False)
            batch = np.concatenate([rng.choice(members[c], self.per_class, replace=len(members[c]) < self.per_class) for c in chosen])
            batch = np.concatenate([batch, rng.choice(len(labels), self.classes_per_batch, replace=False)
                                    if len(labels) >= self.classes_per_batch else np.array([], dtype=np.int64)])
            emb = self.head_(x[batch])
            y = labels_t[batch]
            dist = torch.cdist(emb, emb)
            same = y[:, None] == y[None, :]
            eye = torch.eye(len(batch), dtype=torch.bool)
            hardest_pos = (dist * (same & ~eye)).max(dim=1).values
            hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
            has_pos = (same & ~eye).any(dim=1) & torch.isfinite(hardest_neg)
            loss = torch.relu(hardest_pos - hardest_neg + self.margin)[has_pos].mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            self.losses_.append(float(loss.detach()))

    def transform(self, features: np.ndarray) -> np.ndarray:
        self.check_is_fitted()
        with torch.no_grad():
            return self.head_(self._prepare(np.asarray(features, dtype=np.float32))).numpy()

    def _state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "head": self.head_.state_dict()}

    def _restore(self, state: dict[str, Any]) -> None:
        self.mean_ = state["mean"]
        self.head_ = ProjectionHead(len(self.mean_), self.hidden, self.out_dim)
        self.head_.load_state_dict(state["head"])
        self.head_.eval()


@dataclass
class ProjectionReport:
    """What ``fit_projection`` measured on a held-out share of the catalog, and what it kept."""

    items: int
    categories: int
    holdout: int
    search_raw: float
    search_projected: float
    kept: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def holdout_split(categories: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask of held-out rows: a share of each category that has at least three items."""
    held = np.zeros(len(categories), dtype=bool)
    for category in np.unique(categories):
        rows = np.flatnonzero(categories == category)
        if len(rows) >= 3:
            held[rng.choice(rows, max(1, int(round(fraction * len(rows)))), replace=False)] = True
    return held


def nearest_neighbour_accuracy(support: np.ndarray, support_labels: np.ndarray, queries: np.ndarray,
                               query_labels: np.ndarray) -> float:
    """Share of ``queries`` whose cosine nearest neighbour in ``support`` has their label."""
    nearest = (l2_normalise(queries) @ l2_normalise(support).T).argmax(axis=1)
    return float((support_labels[nearest] == query_labels).mean())


def fit_projection(catalog: Catalog, min_gain: float = 0.005, seed: int = 0, **params: Any) -> ProjectionReport:
    """Train the head on the catalog's deep vectors, check it on a held-out share, keep it where it helps.

    Kept, it becomes the catalog's ``deep_head`` feature (search and classification use it in
    place of ``deep``); not kept, any earlier head is removed.
    """
    started = time.perf_counter()
    dim = catalog.dims().get("deep")
    if dim is None:
        raise ValueError(f"{catalog.location}: this index has no deep features")
    keys, rows = vectors_of(catalog.items, "deep", dim)
    records = catalog.items.items(keys.tolist())
    categories = np.array([records[int(k)].category for k in keys], dtype=object).astype(str)
    held = holdout_split(categories, 0.2, np.random.default_rng(seed))
    if held.sum() == 0:
        raise ValueError("too few items per category to check a finetuned head (need categories with 3+ items)")
    trial = TripletProjection(seed=seed, **params).fit(rows[~held], categories[~held])
    raw = nearest_neighbour_accuracy(rows[~held], categories[~held], rows[held], categories[held])
    projected_rows = trial.transform(rows)
    projected = nearest_neighbour_accuracy(projected_rows[~held], categories[~held], projected_rows[held], categories[held])
    kept = projected >= raw + min_gain
    report = ProjectionReport(len(keys), len(np.unique(categories)), int(held.sum()), raw, projected, kept, 0.0)
    path = Path(catalog.models_dir) / HEAD_FILE
    with catalog.lock:
        if kept:
            head = TripletProjection(seed=seed, **params).fit(rows, categories)
            head.save(path)
            catalog.replace_feature(HEAD_FEATURE, keys, head.transform(rows))
            catalog.enable_feature(HEAD_FEATURE)
        elif path.exists():
            path.unlink()
            catalog.config.features = [name for name in catalog.config.features if name != HEAD_FEATURE]
            catalog.items.delete_feature(HEAD_FEATURE)
            catalog.save()
    report.seconds = time.perf_counter() - started
    log.info("projection head: %s", report)
    return report
