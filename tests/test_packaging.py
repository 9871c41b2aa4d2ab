"""The installed distribution: one package, ``catalens``, that never writes another's top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_catalens_alone_with_its_web_page_and_command(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("catalens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"catalens"}
    assert "catalens/api/static/index.html" in names and "catalens/indexer/features/deep.py" in names
    metadata = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "catalens = catalens.api.cli:main" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_indexer_never_imports_search_or_api_and_search_never_imports_api():
    import ast

    order = {"datasets": 0, "indexer": 1, "search": 2, "api": 3}
    upward = []
    for layer, rank in order.items():
        for path in (ROOT / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                if module and module.startswith("catalens.") and order.get(module.split(".")[1], 0) > rank:
                    upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward


def test_every_benchmark_imports_and_has_a_main():
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        assert callable(getattr(module, "main", None)), path.name
