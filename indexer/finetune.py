"""Metric-learning finetune: a small projection head trained on the index's frozen deep features.

The head (linear, ReLU, linear, L2) is trained with a triplet loss on batch-hard triplets
(P categories x K items per batch, hardest positive and hardest negative per anchor), the
recipe of one-shot face recognition, on the CPU. ``finetune_index`` first checks on a held-out
part of the catalog whether the head helps classification and search (1-NN) and keeps it only
for the uses where it does; ``project`` and ``deep_search_space`` apply it when present.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from indexer.deep import l2_normalise

log = logging.getLogger(__name__)

HEAD_FILE = "projection.pt"
HEAD_META = "projection.json"


class _Head(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=1)


class TripletProjection:
    """sklearn-shaped: ``fit(features, categories)`` trains the head, ``transform`` applies it."""

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
        self.head_ = _Head(x.shape[1], self.hidden, self.out_dim)
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
        if not hasattr(self, "head_"):
            raise RuntimeError("call fit() before transform()")
        with torch.no_grad():
            return self.head_(self._prepare(np.asarray(features, dtype=np.float32))).numpy()

    def save(self, folder: Path, uses: dict[str, bool], report: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"params": self.__dict__ | {"head_": None, "losses_": None, "mean_": None},
                 "mean": torch.from_numpy(self.mean_), "head": self.head_.state_dict()}
        tmp = folder / (HEAD_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(folder / HEAD_FILE)
        (folder / HEAD_META).write_text(json.dumps({"uses": uses, "report": report}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> TripletProjection:
        state = torch.load(folder / HEAD_FILE, map_location="cpu", weights_only=False)
        params = {k: v for k, v in state["params"].items() if not k.endswith("_")}
        model = cls(**params)
        model.mean_ = state["mean"].numpy()
        model.head_ = _Head(len(model.mean_), model.hidden, model.out_dim)
        model.head_.load_state_dict(state["head"])
        model.head_.eval()
        return model


# --- with an index


def _head_uses(index) -> tuple[TripletProjection | None, dict[str, bool]]:
    path = index.models_dir / HEAD_FILE
    meta = index.models_dir / HEAD_META
    if not path.is_file() or not meta.is_file():
        return None, {}
    stamp = f"projection:{path.stat().st_mtime_ns}"
    head = index.cached(stamp, lambda: TripletProjection.load(index.models_dir))
    return head, json.loads(meta.read_text()).get("uses", {})


def project(index, vectors: np.ndarray, use: str = "classify") -> np.ndarray:
    """Deep vectors in the space ``use`` ("classify" or "search") works in: projected where kept."""
    head, uses = _head_uses(index)
    if head is None or not uses.get(use, False):
        return np.asarray(vectors, dtype=np.float32)
    return head.transform(vectors)


def deep_search_space(index) -> tuple[object, Callable[[np.ndarray], np.ndarray]]:
    """The vector store deep search should query, and how to map a query's deep vector into it."""
    head, uses = _head_uses(index)
    if head is None or not uses.get("search", False):
        return index.vector_store("deep"), lambda rows: rows
    stamp = f"deep_projected:{(index.models_dir / HEAD_FILE).stat().st_mtime_ns}"

    def build():
        keys, rows = index.store.vectors("deep", index.meta["dims"]["deep"])
        projected = head.transform(rows)
        store = index.new_vector_store(projected.shape[1], len(keys))
        if not store.is_trained:
            store.train(projected)
        store.add(keys, projected)
        return store

    return index.cached(stamp, build), head.transform


@dataclass
class FinetuneReport:
    items: int
    categories: int
    holdout: int
    classify_raw: float
    classify_projected: float
    search_raw: float
    search_projected: float
    kept_for: list[str]
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _holdout_split(categories: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask of held-out rows: a share of each category that has at least three items."""
    held = np.zeros(len(categories), dtype=bool)
    for category in np.unique(categories):
        rows = np.flatnonzero(categories == category)
        if len(rows) >= 3:
            held[rng.choice(rows, max(1, int(round(fraction * len(rows)))), replace=False)] = True
    return held


def evaluate_projection(features: np.ndarray, categories: np.ndarray, head: TripletProjection | None,
                        train: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(classifier accuracy, 1-NN accuracy) on ``test`` rows with support ``train``, in raw or head space."""
    from search.classify import HierarchicalFewShotClassifier

    space = features if head is None else head.transform(features)
    classifier = HierarchicalFewShotClassifier().fit(space[train], categories[train])
    classify_acc = float((classifier.predict(space[test]) == categories[test]).mean())
    support, queries = l2_normalise(space[train]), l2_normalise(space[test])
    nearest = (queries @ support.T).argmax(axis=1)
    search_acc = float((categories[train][nearest] == categories[test]).mean())
    return classify_acc, search_acc


def finetune_index(index, min_gain: float = 0.005, seed: int = 0, **params) -> FinetuneReport:
    """Train, check on a held-out share of the catalog, and store the head for the uses it helps."""
    started = time.perf_counter()
    dim = index.meta["dims"].get("deep")
    if dim is None:
        raise ValueError(f"{index.root}: this index has no deep features")
    keys, rows = index.store.vectors("deep", dim)
    records = index.store.items(keys.tolist())
    categories = np.array([records[int(k)].category for k in keys], dtype=object).astype(str)
    held = _holdout_split(categories, 0.2, np.random.default_rng(seed))
    if held.sum() == 0:
        raise ValueError("too few items per category to check a finetuned head (need categories with 3+ items)")
    trial = TripletProjection(seed=seed, **params).fit(rows[~held], categories[~held])
    raw = evaluate_projection(rows, categories, None, ~held, held)
    projected = evaluate_projection(rows, categories, trial, ~held, held)
    uses = {"classify": projected[0] >= raw[0] + min_gain, "search": projected[1] >= raw[1] + min_gain}
    kept = [use for use, keep in uses.items() if keep]
    report = FinetuneReport(
        items=len(keys), categories=len(np.unique(categories)), holdout=int(held.sum()),
        classify_raw=raw[0], classify_projected=projected[0], search_raw=raw[1], search_projected=projected[1],
        kept_for=kept, seconds=0.0,
    )
    for name in (HEAD_FILE, HEAD_META):
        (index.models_dir / name).unlink(missing_ok=True)
    if kept:
        head = TripletProjection(seed=seed, **params).fit(rows, categories)
        report.seconds = time.perf_counter() - started
        head.save(index.models_dir, uses, report.to_json())
    report.seconds = time.perf_counter() - started
    log.info("finetune: %s", report)
    return report
