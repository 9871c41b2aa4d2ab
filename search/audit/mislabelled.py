"""Items filed under the wrong category: the category tree, a leave-one-out classifier of the
catalog without each item, and the evidence columns that misfiled items are scored on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalens.indexer.features import l2_normalise
from catalens.search.audit.rows import NeighbourLists

LEVEL_NAMES = ("top", "coarse", "leaf")


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


# The columns of ``mislabel_evidence``, in order; then one gap per stored feature.
MISLABEL_EVIDENCE = ("log p(filed leaf)", "log p(filed leaf) - neighbours' log p(own leaf)", "log p(best other leaf)",
                     "log p(filed parent)", "nearest in filed leaf - nearest elsewhere", "neighbours in filed leaf",
                     "product mates elsewhere", "nearest similarity", "nearest similarity x log p(filed leaf)",
                     "nearest similarity x gap")


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
    # The item's fit against its neighbours' fit to their own leaves: a packshot's neighbours (other
    # packshots) fit theirs as badly as it fits its own, a misfiled photo's fit theirs well.
    own_fit = np.log(p[rows, labels] + 1e-6)
    relative = np.log(p_leaf + 1e-6) - own_fit[combined[:, :k]].mean(axis=1)
    columns = [np.log(p_leaf + 1e-6), relative, np.log(p_other + 1e-6), np.log(p_parent + 1e-6), gap, agree, mates,
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
