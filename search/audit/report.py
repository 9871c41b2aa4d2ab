"""The audit: every job run over the catalog, gathered into one report of findings, most probable
first."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from catalens.indexer.features import l2_normalise
from catalens.search.audit.dismissals import item_digest, read_dismissed
from catalens.search.audit.duplicates import duplicate_pairs, duplicate_score, stored_pair_inliers
from catalens.search.audit.mislabelled import (
    LeaveOneOut,
    _planted_leaves,
    disagreeing_level,
    leave_one_out,
    mislabel_evidence,
    parent_of,
)
from catalens.search.audit.non_products import _own_loo, placeholder_rows, product_evidence
from catalens.search.audit.records import AuditReport, AuditSettings, Finding
from catalens.search.audit.rows import CatalogRows, NeighbourLists, nearest
from catalens.search.audit.scoring import EvidenceModel
from catalens.search.audit.verified import LeafMatches, verified_rescore

log = logging.getLogger(__name__)


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
    # A member's doubt is about the leaf it is read under: an item moved there, the chance the move is wrong.
    matches = (LeafMatches.of_catalog(catalog, data.keys, embedding, current, settings.verify_per_leaf,
                                      doubt=np.where(current != labels, 1.0 - mislabel_p, mislabel_p))
               if settings.verify_shortlist else None)
    verified: dict[int, tuple[int, int]] = {}
    if matches is not None:
        others = loo.proba.copy()
        others[np.arange(n), planted_leaf] = -1.0
        mislabel_p, verified = verified_rescore(matches, model, filed, planted, labels, suggested, planted_leaf,
                                                others.argmax(axis=1), settings.verify_shortlist, rng)
    steps.update()

    duplicates = duplicate_pairs(data, neighbours, settings, stored_pair_inliers(catalog, data.keys))
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
                         kinds, kind_of, settings, verified)
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


def _findings(data: CatalogRows, leaves: np.ndarray, labels: np.ndarray, suggested: np.ndarray,
              mislabel_p: np.ndarray, loo: LeaveOneOut, neighbours: NeighbourLists,
              duplicates: list[tuple[int, int, float, bool]], product_p: np.ndarray, kinds: list[str],
              kind_of: np.ndarray | None, settings: AuditSettings,
              verified: dict[int, tuple[int, int]] | None = None) -> list[Finding]:
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
        if verified and int(i) in verified:
            evidence["verified_inliers"] = dict(zip(("filed", "suggested"), verified[int(i)], strict=True))
        listed.append(Finding(ids[i], categories[i], "mislabelled", leaf, float(mislabel_p[i]), evidence))
    return sorted(listed, key=lambda finding: -finding.score)


def select(findings: Sequence[Finding], category: str | None = None, problem: str | None = None,
           top: int | None = None) -> list[Finding]:
    """The findings under a category prefix of whole levels and of one problem, the first ``top``."""
    out = [finding for finding in findings
           if (not category or finding.category == category or finding.category.startswith(category + "/"))
           and (not problem or finding.problem == problem)]
    return out[:top] if top else out
