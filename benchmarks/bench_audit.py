"""Catalog audit on grocery iconic + train with planted errors, against a leave-one-out kNN baseline.

    .venv/bin/python benchmarks/bench_audit.py [--seeds 0 1 2] [--work benchmarks/out/audit]
                                               [--finetune labels|unlabeled]

Per seed, three catalogs made from ``catalog_items(("iconic", "train"))`` (the generator below,
with the seed):
- misfiled: 5% of train photos filed under another leaf, half under a sister leaf of the same
  parent, half anywhere; the same on a subset of 5 train photos a product (+ the iconic images);
- copies: 60 train photos uploaded again under new ids: 15 exact copies (half under the same
  leaf), 15 re-encoded (JPEG q40), 15 resized to 50%, 15 cropped by 10% a side, the last 45 under
  another leaf; and 30 non-products (blank, noise, a document, a barcode-only label) filed
  under random leaves.
``--finetune``: the misfiled catalog of every photo is audited after ``finetune`` on its own
(planted) labels, with ``unlabeled`` also on grocery's val photos as the shop's unlabeled photos
(``--unlabeled``); ~30 and ~50 minutes a seed on 2 cores.
The images are indexed once into ``WORK/base-index``; each catalog is a copy of it brought in line
with its manifest (categories only, or a few new images). The baseline is a plain leave-one-out
kNN (k=10, similarity-weighted) on the frozen lite0 ``deep`` rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from catalens.api.tables import format_table
from catalens.datasets.catalog import CatalogItem
from catalens.datasets.grocery import catalog_items
from catalens.indexer.features import l2_normalise
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores import vectors_of
from catalens.indexer.stores.backends import open_catalog
from catalens.search.audit import AuditSettings, audit, parent_of

FRACTION = 0.05


# --- the generator


def plant_mislabels(items: list[CatalogItem], seed: int) -> tuple[list[CatalogItem], dict[str, tuple[str, str]]]:
    """5% of the train photos under another leaf: half a sister leaf, half any. -> (items, {id: (true, filed, kind)})."""
    rng = np.random.default_rng(seed)
    leaves = sorted({item.category for item in items})
    train = [i for i, item in enumerate(items) if item.attributes.get("split") == "train"]
    chosen = rng.choice(train, int(round(FRACTION * len(train))), replace=False)
    planted = {}
    out = list(items)
    for n, position in enumerate(chosen):
        item = items[position]
        sisters = [leaf for leaf in leaves if parent_of(leaf) == parent_of(item.category) and leaf != item.category]
        kind = "sister" if n % 2 == 0 and sisters else "any"
        pool = sisters if kind == "sister" else [leaf for leaf in leaves if leaf != item.category]
        wrong = str(rng.choice(pool))
        out[position] = CatalogItem(item.id, item.image, wrong, item.title, item.attributes)
        planted[item.id] = (item.category, wrong, kind)
    return out, planted


def five_a_product(items: list[CatalogItem], seed: int) -> list[CatalogItem]:
    rng = np.random.default_rng(1000 + seed)
    by_leaf = defaultdict(list)
    for item in items:
        if item.attributes.get("split") == "train":
            by_leaf[item.category].append(item)
    keep = {item.id for item in items if item.attributes.get("split") == "iconic"}
    for members in by_leaf.values():
        keep.update(members[i].id for i in rng.choice(len(members), min(5, len(members)), replace=False))
    return [item for item in items if item.id in keep]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1
        return ImageFont.load_default()


def non_product(kind: str, rng: np.random.Generator, size: int = 348) -> Image.Image:
    if kind == "blank":
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 2, (size, size, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)
    if kind == "noise":
        style = rng.integers(3)
        if style == 0:
            return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        if style == 1:
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            return Image.fromarray(small).resize((size, size), Image.NEAREST)
        return Image.fromarray(np.clip(rng.normal(128, 60, (size, size, 3)), 0, 255).astype(np.uint8))
    if kind == "document":
        page = Image.new("RGB", (size, int(size * 1.3)), (255, 255, 252))
        draw = ImageDraw.Draw(page)
        words = "invoice order total amount delivery date customer number item price quantity tax".split()
        draw.text((20, 14), "INVOICE " + str(rng.integers(1000, 9999)), fill=(0, 0, 0), font=_font(22))
        for line in range(18):
            text = " ".join(rng.choice(words, 5))
            draw.text((20, 50 + line * 20), text, fill=(20, 20, 20), font=_font(14))
        return page
    label = Image.new("RGB", (size, size // 2), (255, 255, 255))
    draw = ImageDraw.Draw(label)
    x = 30
    while x < size - 40:
        width = int(rng.integers(1, 5))
        if rng.random() < 0.55:
            draw.rectangle((x, 20, x + width - 1, size // 2 - 40), fill=(0, 0, 0))
        x += width
    digits = "".join(str(d) for d in rng.integers(0, 10, 13))
    draw.text((40, size // 2 - 34), digits, fill=(0, 0, 0), font=_font(20))
    return label


def plant_copies(items: list[CatalogItem], seed: int, folder: Path
                 ) -> tuple[list[CatalogItem], dict[str, tuple[str, str]], list[str]]:
    """-> (items, {new id: (original id, kind)}, non-product ids)."""
    rng = np.random.default_rng(2000 + seed)
    folder.mkdir(parents=True, exist_ok=True)
    leaves = sorted({item.category for item in items})
    train = [item for item in items if item.attributes.get("split") == "train"]
    sources = [train[i] for i in rng.choice(len(train), 60, replace=False)]
    out, copies, junk = list(items), {}, []
    for n, source in enumerate(sources):
        kind = ("exact", "re-encoded", "resized", "cropped")[n // 15]
        new_id = f"planted/copy-{seed}-{n:02d}{Path(source.image).suffix}"
        path = folder / Path(new_id).name
        if kind == "exact":
            shutil.copyfile(source.image, path)
        else:
            image = Image.open(source.image).convert("RGB")
            if kind == "resized":
                image = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)
            elif kind == "cropped":
                dx, dy = image.width // 10, image.height // 10
                image = image.crop((dx, dy, image.width - dx, image.height - dy))
            image.save(path, quality=40 if kind == "re-encoded" else 90)
        same_leaf = kind == "exact" and n % 2 == 0
        category = source.category if same_leaf else str(rng.choice([leaf for leaf in leaves if leaf != source.category]))
        out.append(CatalogItem(new_id, path, category, source.title, {"split": "planted"}))
        copies[new_id] = (source.id, kind)
    for n in range(30):
        kind = ("blank", "noise", "document", "barcode")[n % 4]
        new_id = f"planted/junk-{seed}-{n:02d}.jpg"
        path = folder / Path(new_id).name
        non_product(kind, rng).save(path, quality=90)
        out.append(CatalogItem(new_id, path, str(rng.choice(leaves)), kind, {"split": "planted"}))
        junk.append(new_id)
    return out, copies, junk


# --- indexes


def variant(base: Path, location: Path, items: list[CatalogItem]) -> Path:
    """A copy of the base index brought in line with ``items`` (metadata, removals, a few new images)."""
    if not location.exists():
        shutil.copytree(base, location)
        index_catalog(items, location, progress=False)
    return location


# --- measures


def knn_baseline(catalog, k: int = 10) -> tuple[list[str], list[str], np.ndarray]:
    """Leave-one-out kNN on the frozen deep rows: (ids ranked most suspicious first, suggestions, scores)."""
    keys, rows = vectors_of(catalog.items, "deep", catalog.dims()["deep"])
    records = catalog.items.items(keys.tolist())
    ids = [records[int(key)].id for key in keys]
    categories = np.array([records[int(key)].category for key in keys])
    rows = l2_normalise(rows)
    sims = rows @ rows.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.take_along_axis(sims, top, axis=1)
    weights = np.exp(weights / 0.05)
    scores, suggestions = np.zeros(len(ids)), []
    for i in range(len(ids)):
        votes = defaultdict(float)
        for j, w in zip(top[i], weights[i], strict=True):
            votes[categories[j]] += w
        total = sum(votes.values())
        scores[i] = 1 - votes.get(categories[i], 0.0) / total
        others = {c: v for c, v in votes.items() if c != categories[i]}
        suggestions.append(max(others, key=others.get) if others else categories[i])
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], [suggestions[i] for i in order], scores[order]


def mislabel_figures(ranked: list[str], suggested: list[str], planted: dict[str, tuple[str, str, str]]) -> dict:
    K = len(planted)
    first = list(zip(ranked[:K], suggested[:K], strict=True))
    hits = [(i, s) for i, s in first if i in planted]
    sister = [i for i, _ in hits if planted[i][2] == "sister"]
    return {"K": K, "precision": len(hits) / K, "suggestion": sum(s == planted[i][0] for i, s in hits) / max(len(hits), 1),
            "sister": f"{len(sister)}/{sum(kind == 'sister' for *_, kind in planted.values())}"}


def finetuned(location: Path, finetune: str) -> Path:
    """A copy of ``location`` after ``finetune`` on its own labels (and val's photos, unlabeled)."""
    from catalens.indexer.training.adaptation import adapt_catalog

    target = location.with_name(f"{location.name}-finetune-{finetune}")
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(location, partial)
        catalog = open_catalog(partial)
        try:
            unlabeled = [item.image for item in catalog_items(("val",))] if finetune == "unlabeled" else ()
            print(adapt_catalog(catalog, progress=True, unlabeled=unlabeled), flush=True)
        finally:
            catalog.close()
        partial.rename(target)
    return target


def run_seed(seed: int, work: Path, base: Path, finetune: str | None = None) -> dict:
    items = catalog_items(("iconic", "train"))
    out = {}
    settings = AuditSettings(min_score=0.0)
    for name, subset in (("all", items), ("5 a product", five_a_product(items, seed))):
        planted_items, planted = plant_mislabels(subset, seed)
        location = variant(base, work / f"seed{seed}-{name.replace(' ', '')}", planted_items)
        if finetune and name == "all":
            location = finetuned(location, finetune)
        catalog = open_catalog(location)
        try:
            report = audit(catalog, settings)
            findings = [f for f in report.findings if f.problem == "mislabelled"]
            ours = mislabel_figures([f.id for f in findings], [f.suggested for f in findings], planted)
            ours["listed"] = sum(f.score >= 0.5 for f in findings)
            ours["seconds"] = report.seconds
            ranked, suggestions, _ = knn_baseline(catalog)
            base_fig = mislabel_figures(ranked, suggestions, planted)
        finally:
            catalog.close()
        out[name] = {"audit": ours, "knn": base_fig}
        print(seed, name, json.dumps(out[name]), flush=True)
    copied, copies, junk = plant_copies(items, seed, work / f"seed{seed}-images")
    location = variant(base, work / f"seed{seed}-copies", copied)
    catalog = open_catalog(location)
    try:
        started = time.perf_counter()
        report = audit(catalog)
        seconds = time.perf_counter() - started
        dups = [f for f in report.findings if f.problem == "duplicate"]
        found, false = set(), 0
        for finding in dups:
            pair = {finding.id, *finding.evidence["ids"]}
            matched = [new for new, (orig, _) in copies.items() if {new, orig} <= pair]
            found.update(matched)
            false += not matched
        products = [f.id for f in sorted(report.findings, key=lambda f: -f.score) if f.problem == "not-a-product"]
        # Everything scored, not only what clears 0.5: where each planted non-product ranks.
        all_scored = audit(catalog, AuditSettings(min_score=0.0))
        odd = [f.id for f in all_scored.findings if f.problem == "not-a-product"]
        ranks = sorted(odd.index(j) + 1 if j in odd else 10**6 for j in junk)
        by_kind = defaultdict(list)
        for new, (_, kind) in copies.items():
            by_kind[kind].append(new in found)
        out["copies"] = {"recall": len(found) / len(copies), "false": false,
                         "false_per_1000": 1000 * false / report.items, "items": report.items,
                         "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in by_kind.items()},
                         "junk_in_top50": sum(r <= 50 for r in ranks), "junk_worst_rank": ranks[-1],
                         "junk_listed": sum(j in products for j in junk), "seconds": seconds}
        print(seed, "copies", json.dumps(out["copies"]), flush=True)
    finally:
        catalog.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/audit"))
    parser.add_argument("--finetune", choices=("labels", "unlabeled"),
                        help="audit the misfiled catalog of every photo after finetune (on val's photos, unlabeled)")
    args = parser.parse_args()
    base = args.work / "base-index"
    if not base.exists():
        index_catalog(catalog_items(("iconic", "train")), base, progress=True)
    results = {seed: run_seed(seed, args.work, base, args.finetune) for seed in args.seeds}
    (args.work / f"results{'-finetune-' + args.finetune if args.finetune else ''}.json").write_text(
        json.dumps(results, indent=1))
    if args.finetune:
        print(f"the 2,721-item catalog audited after finetune on its labels"
              f"{' and val photos unlabeled' if args.finetune == 'unlabeled' else ''}")
    rows = []
    for seed, r in results.items():
        for name in ("all", "5 a product"):
            a, b = r[name]["audit"], r[name]["knn"]
            rows.append((seed, name, a["K"], f"{100 * a['precision']:.1f}", f"{100 * a['suggestion']:.1f}", a["sister"],
                         f"{100 * b['precision']:.1f}", f"{100 * b['suggestion']:.1f}", b["sister"],
                         f"{a['seconds']:.1f}"))
    print(format_table(["seed", "catalog", "K", "precision@K", "suggested right", "sister found",
                        "kNN precision@K", "kNN suggested", "kNN sister", "audit s"], rows))
    rows = [(seed, f"{100 * r['copies']['recall']:.1f}", r["copies"]["false"], f"{r['copies']['false_per_1000']:.2f}",
             " ".join(f"{k} {v}" for k, v in r["copies"]["by_kind"].items()),
             f"{r['copies']['junk_in_top50']}/30", r["copies"]["junk_worst_rank"], f"{r['copies']['seconds']:.1f}")
            for seed, r in results.items()]
    print(format_table(["seed", "duplicate recall", "false", "per 1,000", "by kind", "non-products in top 50",
                        "worst rank", "audit s"], rows))


if __name__ == "__main__":
    main()
