"""Pseudo-labels for a shop's unlabeled photos: which catalog product each one most likely shows.

Self-training (``catalens finetune --unlabeled``) retrains the adapted network on the photos it
is surest of. Two things keep it from teaching itself its own mistakes:

- the assignment is balanced over the products (a few Sinkhorn iterations, as in SwAV or
  self-labelling by optimal transport): without it the few products whose packshot looks most
  like a shop photo (a pile of produce) absorb the photos of many others;
- only the surest share of each product's photos is kept, so every product gets some photos and
  none gets its doubtful ones.

Arrays in, arrays out: embeddings and prototypes are L2-normalised rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalens.indexer.features import l2_normalise


@dataclass(frozen=True)
class PseudoLabels:
    """``rows`` of the unlabeled photos kept, each one's ``labels`` (a prototype's index) and ``confidence``."""

    rows: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


def product_prototypes(rows: np.ndarray, products: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct products, sorted; each one's prototype: the L2-normalised sum of its rows)."""
    names, product_of_row = np.unique(products, return_inverse=True)
    prototypes = np.zeros((len(names), rows.shape[1]), np.float64)
    np.add.at(prototypes, product_of_row, rows)
    return names, prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)


def beside_colour(rows: np.ndarray, colour: np.ndarray, weight: float) -> np.ndarray:
    """``rows`` (L2-normalised) with each one's colour histogram beside it at ``weight``, the
    whole L2-normalised again: a dot product of two is (cosine + weight x colour cosine) / (1 + weight).

    The network's embedding is trained to see past colour (ImageNet's colour jitter), yet the
    products it confuses most in a shop photo (Golden Delicious and Granny Smith, red and yellow
    peppers) differ in little else."""
    return np.hstack([rows, np.sqrt(weight) * l2_normalise(colour)]) / np.sqrt(1 + weight)


def balanced_assignment(similarity: np.ndarray, temperature: float = 0.05, iterations: int = 3) -> np.ndarray:
    """(n, c) assignment probabilities of n photos to c products, each product about n / c photos.

    ``similarity`` is the photos' cosine to each product's prototype. Rows sum to 1."""
    logits = (similarity - similarity.max(axis=1, keepdims=True)) / temperature
    q = np.exp(logits).astype(np.float64)
    n, c = q.shape
    for _ in range(iterations):
        q /= np.maximum(q.sum(axis=0, keepdims=True), 1e-300) * c / n  # each product n / c in all
        q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)  # each photo one in all
    return q


def select_pseudo_labels(embeddings: np.ndarray, prototypes: np.ndarray, share: float,
                         temperature: float = 0.05, balanced: bool = True) -> PseudoLabels:
    """Each photo's likeliest product, and of each product's photos the surest ``share`` (at least one).

    ``embeddings`` (n, d) and ``prototypes`` (c, d) are L2-normalised."""
    if not len(embeddings) or not len(prototypes):
        empty = np.zeros(0, np.int64)
        return PseudoLabels(empty, empty, np.zeros(0))
    similarity = embeddings @ prototypes.T
    q = balanced_assignment(similarity, temperature) if balanced else _softmax(similarity / temperature)
    labels = q.argmax(axis=1)
    confidence = q.max(axis=1)
    kept = []
    for product in np.unique(labels):
        members = np.flatnonzero(labels == product)
        count = max(1, int(round(share * len(members))))
        kept.append(members[np.argsort(-confidence[members], kind="stable")[:count]])
    rows = np.sort(np.concatenate(kept))
    return PseudoLabels(rows, labels[rows], confidence[rows])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def name_shop_photos(item_rows: np.ndarray, item_products: np.ndarray, photo_rows: np.ndarray,
                     share: float) -> PseudoLabels:
    """The shop photos named by the items' products (``select_pseudo_labels`` against each
    product's prototype), the surest ``share`` of each product's kept. The rows may be the
    network's alone or with the colour beside them (``beside_colour``), items and photos alike."""
    return select_pseudo_labels(photo_rows, product_prototypes(item_rows, item_products)[1], share)


def toward_shop_photos(item_rows: np.ndarray, item_products: np.ndarray, photo_rows: np.ndarray,
                       named: PseudoLabels, own_weight: float) -> tuple[np.ndarray, int]:
    """Each item's row moved toward the shop photos ``named`` for its product (``name_shop_photos``):
    ``own_weight`` of the item's own row plus the rest of the mean of those photos' rows,
    renormalised. Returns the rows and how many products had photos to move toward (the others
    keep theirs).

    A packshot and a shop photo of one product are further apart than two shop photos of it, so
    a shop's query finds its product more often by what the product looks like in that shop.
    Pseudo-labels are wrong for some photos; the mean of many, most of them right, still points
    the right way (prototype rectification in the few-shot literature). One naming can move
    several features' rows (the network's, the colour's) toward the same photos."""
    products = np.unique(item_products)
    product_of_item = np.searchsorted(products, item_products)
    means = np.zeros((len(products), item_rows.shape[1]), np.float64)
    np.add.at(means, named.labels, photo_rows[named.rows])
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    has_photos = norms[:, 0] > 1e-12
    means = np.where(has_photos[:, None], means / np.maximum(norms, 1e-12), 0.0)
    moved = own_weight * item_rows + (1 - own_weight) * means[product_of_item]
    moved = np.where(has_photos[product_of_item][:, None], moved, item_rows)
    moved /= np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)
    return moved.astype(np.float32), int(has_photos.sum())
