"""MkDocs hook: lay the ``catalens`` package out as it is installed, for the API reference.

``catalens`` is assembled from several folders of the repository (``[tool.setuptools.package-dir]``
in pyproject.toml: ``catalens`` from ``catalens_pkg/``, ``catalens.search`` from ``search/``, ...),
which griffe, the reader behind mkdocstrings, cannot follow. Before a build this links the folders
into a temporary ``catalens/`` tree and points the Python handler at it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent


def package_tree(into: Path) -> Path:
    """``into/catalens``, whose files and sub-packages link to the repository's folders."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = into / "catalens"
    package.mkdir(parents=True)
    for source in (ROOT / mapping["catalens"]).glob("*.py"):
        (package / source.name).symlink_to(source)
    for name, folder in mapping.items():
        if name != "catalens":
            (package / name.split(".", 1)[1]).symlink_to(ROOT / folder, target_is_directory=True)
    return into


@event_priority(100)  # before mkdocstrings reads its handlers' configuration
def on_config(config):
    into = Path(tempfile.mkdtemp(prefix="catalens-docs-"))
    atexit.register(shutil.rmtree, into, ignore_errors=True)
    handlers = config["plugins"]["mkdocstrings"].config.setdefault("handlers", {})
    python = handlers.setdefault("python", {})
    python["paths"] = [str(package_tree(into))]
    return config
