"""The time of the first search after ``catalens index``: a shop indexes its catalog, then asks.

    .venv/bin/python -m benchmarks.bench_first_search [--products 40] [--photos 6] [--baseline ee0172a]
        [--work DIR]

The catalog is ``--photos`` train photos of each of the first ``--products`` fine classes of
grocery (40 x 6 = 240 items), written as a JSONL manifest. For each tree (this one, and the
``--baseline`` commit checked out into a temporary git worktree; ``--baseline ''`` skips it) it
runs, each in a fresh process as a user would: ``catalens index MANIFEST --index DIR --quiet``,
then ``catalens search PHOTO --index DIR --json`` (the first search: a val photo of the first
product), then the same search again (the floor: process start, models read back, one query).
The baseline tree is imported by pointing this environment's editable install at its folders,
so both trees run on the same interpreter and packages. It prints the wall time of each step
and whether the first search's results carry a confidence.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from catalens.api.tables import format_table
from catalens.datasets.catalog import write_manifest
from catalens.datasets.grocery import catalog_items, split_photos

REPO = Path(__file__).resolve().parents[1]

# Runs catalens' CLI from the tree in argv[1]: the editable install's finder maps each
# ``catalens.*`` sub-package to a folder, and those folders are redirected before any import.
_BOOTSTRAP = """
import os, sys
tree = sys.argv[1]
finders = [module for name, module in list(sys.modules.items())
           if name.startswith("__editable__") and name.endswith("_finder") and hasattr(module, "MAPPING")]
if not finders:
    sys.exit("bench_first_search: catalens is not an editable install here; cannot redirect it")
for finder in finders:
    for package, folder in list(finder.MAPPING.items()):
        finder.MAPPING[package] = os.path.join(tree, os.path.basename(folder))
from catalens.api.cli import main
sys.exit(main(sys.argv[2:]))
"""


def pick_catalog(products: int, photos: int) -> tuple[list, Path]:
    """``photos`` train items of each of the first ``products`` fine classes, and a val photo of the first."""
    by_class: dict[str, list] = {}
    for item in catalog_items(("train",)):
        by_class.setdefault(item.category, []).append(item)
    chosen = [category for category in sorted(by_class) if len(by_class[category]) >= photos][:products]
    items = [item for category in chosen for item in by_class[category][:photos]]
    query = next(photo.path for photo in split_photos("val") if photo.category == chosen[0])
    return items, Path(query)


def catalens(tree: Path, *argv: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(tree), *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"catalens {' '.join(argv)} failed ({done.returncode}) from {tree}:\n{done.stderr[-3000:]}")
    return seconds, done


def run_tree(label: str, tree: Path, manifest: Path, query: Path, work: Path) -> tuple:
    index = work / f"index-{label}"
    indexing, _ = catalens(tree, "index", str(manifest), "--index", str(index), "--quiet")
    first, done = catalens(tree, "search", str(query), "--index", str(index), "--k", "5", "--json")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    again, _ = catalens(tree, "search", str(query), "--index", str(index), "--k", "5", "--json")
    confident = all(hit.get("confidence") is not None for hit in answer["results"])
    print(f"  {label}: index {indexing:.1f}s, first search {first:.1f}s, second {again:.1f}s", flush=True)
    return label, f"{indexing:.1f}", f"{first:.1f}", f"{again:.1f}", "yes" if confident else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--baseline", default="ee0172a", help="a commit to compare with ('' for none)")
    parser.add_argument("--work", type=Path, help="folder for the manifest and indexes (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="first-search-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        items, query = pick_catalog(args.products, args.photos)
        manifest = write_manifest(items, work / "catalog.jsonl")
        print(f"catalog: {len(items)} items ({args.products} products x {args.photos} photos); query {query.name}")
        rows = []
        trees = [("this tree", REPO)]
        baseline = work / "baseline-tree"
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(baseline), args.baseline],
                           check=True, capture_output=True)
            trees.insert(0, (f"baseline {args.baseline}", baseline))
        try:
            for label, tree in trees:
                rows.append(run_tree(label.replace(" ", "-"), tree, manifest, query, work))
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)],
                               capture_output=True)
    print()
    print(format_table(["tree", "index (s)", "first search (s)", "second search (s)", "confidence"], rows))


if __name__ == "__main__":
    main()
