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


LAYERS = {"catalens_pkg": "catalens", "datasets": "catalens.datasets", "indexer": "catalens.indexer",
          "search": "catalens.search", "api": "catalens.api"}


def _module_files() -> dict[str, Path]:
    """Every catalens module, by its dotted name, and its file."""
    modules = {}
    for folder, package in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def test_no_import_circle_between_catalens_modules():
    """Counting every import in a file (top level, TYPE_CHECKING blocks, inside functions): a
    circle means two modules that can only be understood, and changed, together."""
    import ast

    modules = _module_files()
    imports: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                named = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            imports[name].update(other for other in named if other in modules and other != name)
    # Tarjan's strongly connected components: any of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in imports[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_no_library_module_over_600_lines():
    """A longer module holds more than one job: split it along them."""
    long = {name: n for name, path in _module_files().items() if (n := len(path.read_text().splitlines())) > 600}
    assert not long, long


def test_every_benchmark_imports_and_has_a_main():
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        assert callable(getattr(module, "main", None)), path.name
