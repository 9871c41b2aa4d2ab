"""One typed configuration object, from defaults, a TOML file and ``CATALENS_*`` variables."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class IndexConfig:
    """How an index is built. Stored with the index, so later runs build it the same way."""

    backbone: str = "efficientnet_lite0"
    # faiss index_factory string: "Flat" is exact and right up to ~1M items on one machine.
    faiss_factory: str = "Flat"
    # faiss.ParameterSpace string applied whenever the index is opened ("nprobe=32,k_factor_rf=4");
    # "auto" is indexer.vector_store.recommended_search_parameters(faiss_factory).
    faiss_search_params: str = "auto"
    runtime: str = "auto"  # auto | openvino | torch
    batch_size: int = 16
    num_workers: int = 1  # decode processes; the network uses the other core
    max_pixels: int = 80_000_000
    # How many images between durable commits of an indexing run (what a crash can cost).
    commit_every: int = 128
    local_features: bool = True
    # The centre's colour histogram (indexer/colour.py): classification leans on it.
    colour_features: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _coerce(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(like, int):
        return int(value)
    return value


def load_config(path: str | Path | None = None, **overrides: Any) -> IndexConfig:
    """Defaults, then ``path`` (or ``$CATALENS_CONFIG``) TOML, then ``CATALENS_<FIELD>``, then overrides."""
    config = IndexConfig()
    path = path or os.environ.get("CATALENS_CONFIG")
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as handle:
            values.update(tomllib.load(handle).get("index", {}))
    for f in dataclasses.fields(IndexConfig):
        env = os.environ.get(f"CATALENS_{f.name.upper()}")
        if env is not None and f.name != "extra":
            values[f.name] = _coerce(env, getattr(config, f.name))
    values.update({key: value for key, value in overrides.items() if value is not None})
    return dataclasses.replace(config, **values)
