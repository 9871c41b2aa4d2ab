"""The features an index holds, by registry: each module of this package registers one.

As in LIRE, a feature is global (one L2-normalised vector per image: deep, colour, style,
autoencoder codes) or local (many descriptors per image: RootSIFT); a text feature reads the
words printed in an image, which the item store's text index makes searchable. Both do their work in two
steps: ``preparer`` runs in a decode worker process on the decoded image, ``finish`` in the main
process on a batch of what the preparers returned. Indexing, search, fusion and
classification loop over the registered features; none of them knows a feature by name.

A registry entry declares the feature's kind, dimension, similarity, what must be fitted on the
catalog before it can be extracted, and its default weights in fused search and in
classification. Adding a descriptor is one module here plus its name in
``IndexConfig.features``.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from PIL import Image

from catalens.errors import InputError, UnavailableError
from catalens.indexer.fitted import FittedSlot

Preparer = Callable[[Image.Image], Any]


class FeatureUnavailableError(UnavailableError, RuntimeError):
    """A feature this catalog cannot compute (yet): the message says why and what to run."""


class UnknownFeatureError(InputError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@runtime_checkable
class GlobalFeature(Protocol):
    """One L2-normalised float32 vector per image."""

    name: str
    dim: int
    preparer: Preparer
    draft_size: int

    def finish(self, prepared: list[Any]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""


@runtime_checkable
class LocalFeature(Protocol):
    """Many descriptors per image, stored as one blob an image, matched by geometric verification."""

    name: str
    preparer: Preparer  # image -> LocalDescriptors
    draft_size: int

    def finish(self, prepared: list[Any]) -> list[bytes]:
        """One serialised descriptor set per image."""

    def decode(self, blob: bytes) -> Any:
        """A stored blob back to its descriptors."""

    def quantise(self, descriptors: Any) -> np.ndarray:
        """Visual word ids of ``descriptors`` under the catalog's current vocabulary."""

    def describe_scene(self, image: Any, max_keypoints: int, image_size: int) -> Any:
        """The descriptors of a photo of several products (``locate``): up to ``max_keypoints`` at a
        long side of ``image_size``, more than one item's, for products that fill a part of it."""


@runtime_checkable
class TextFeature(Protocol):
    """The words read from an image, as one string (the item store indexes it for text search)."""

    name: str
    preparer: Preparer  # image -> str
    draft_size: int

    def finish(self, prepared: list[Any]) -> list[str]:
        """One string of words per image."""

    def decode(self, blob: bytes) -> str:
        """A stored row back to its words."""


Feature = GlobalFeature | LocalFeature | TextFeature


Window = tuple[int, int, int, int]


@runtime_checkable
class WindowEmbedder(Protocol):
    """A global feature that embeds many square windows of one photo for less than a crop each
    (``locate``'s region windows): what depends only on the pixels is computed once per window side."""

    def window_rows(self, image: Image.Image, windows: Sequence[Window]) -> np.ndarray:
        """(n, dim) L2-normalised rows, one per window (x0, y0, x1, y1), as its crop would give."""


def windows_by_side(windows: Sequence[Window]) -> dict[int, list[int]]:
    """The windows' positions, grouped by side: one scaled copy of the photo serves each group."""
    groups: dict[int, list[int]] = {}
    for position, (x0, y0, x1, y1) in enumerate(windows):
        groups.setdefault(max(x1 - x0, y1 - y0), []).append(position)
    return groups


def embed(feature: Feature, images: Sequence[Image.Image], one_view: bool = False) -> Any:
    """``feature`` of already-decoded images: (n, dim) rows, or descriptor blobs.

    ``one_view``: a feature that embeds several views of an image (``deep_ft`` adds its mirror
    image, as its catalog rows were made) embeds the image alone, with ``finish_one_view``:
    half the network passes, for many crops of one photo. Other features are unchanged."""
    prepared = [feature.preparer(image) for image in images]
    finish = getattr(feature, "finish_one_view", None) if one_view else None
    return (finish or feature.finish)(prepared)


@dataclass(frozen=True)
class FeatureSpec:
    """A registered feature: what it is, and how a catalog builds it.

    ``build(catalog)`` returns the feature, or raises ``FeatureUnavailableError`` where what it
    needs is missing. The catalog is an ``indexer.catalog.Catalog``, typed ``Any`` here because
    the catalog imports this registry. What is fitted on the catalog for a feature is a
    ``FittedSlot`` (``indexer.fitted``): ``model``, the one it is built from (unavailable until it
    holds a model, rebuilt when it changes), and ``fitted``, those it uses once built (a visual
    vocabulary); ``catalens check`` verifies each stored one and fits again those it can.
    ``refresh(catalog, changed_keys, removed_keys)`` keeps what depends on the whole catalog (a
    visual vocabulary and words) in line after a run. ``search_weight`` and ``classify_weight``
    are its default weights in fused search and classification, ``packshot_search_weight`` its
    fused weight in a catalog of packshots (``feature_weights``) where it differs; a feature with
    ``replaces`` set stands in for that one wherever both are present.

    What an index's configuration (``IndexConfig``) holds for the feature, applied there without
    naming it: ``written_options`` are written into a new index's ``feature_options`` (so the
    index keeps them when the defaults change), ``stored_options`` are what a stored
    configuration without them was built with. From before ``IndexConfig.features`` was a list,
    ``legacy_switch`` names the boolean setting that left the feature out (stored, and read as
    the variable ``CATALENS_<SWITCH>``), ``legacy_options`` the key of the untyped ``extra`` table
    that held its options.
    """

    name: str
    kind: Literal["global", "local", "text"]
    build: Callable[[Any], Feature]
    dim: int | None = None  # None: it depends on the backbone or on the fitted model
    similarity: Literal["cosine", "inliers", "bm25"] = "cosine"
    model: FittedSlot | None = None
    fitted: tuple[FittedSlot, ...] = ()
    refresh: Callable[[Any, np.ndarray, np.ndarray], None] | None = None
    search_weight: float = 0.0
    classify_weight: float = 0.0
    packshot_search_weight: float | None = None
    replaces: str | None = None
    description: str = ""
    # Rows are square-rooted, L2-normalised histograms (their squares sum to one): how spread
    # they are tells a blank or two-tone picture from a photo (the audit's non-products).
    histogram: bool = False
    written_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    stored_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    legacy_switch: str | None = None
    legacy_options: str | None = None

    @property
    def slots(self) -> tuple[FittedSlot, ...]:
        """Every ``FittedSlot`` of the feature, its model's first."""
        return (self.model, *self.fitted) if self.model is not None else self.fitted

    @property
    def fitted_by(self) -> str | None:
        """The command that fits the model the feature is built from, where only a command does."""
        return self.model.fitted_by if self.model is not None else None


_REGISTRY: dict[str, FeatureSpec] = {}


def register_feature(name: str, kind: Literal["global", "local", "text"], **spec: Any) -> Callable[[Callable], Callable]:
    """Decorator over a ``build(catalog)`` function: registers ``name`` as a feature."""

    def decorate(build: Callable[[Any], Feature]) -> Callable[[Any], Feature]:
        _REGISTRY[name] = FeatureSpec(name=name, kind=kind, build=build, **spec)
        return build

    return decorate


_discovered = False
# Modules of this package that register no feature: the decode loop, the OCR reader (``text``'s,
# imported by it), and the models fitted on the catalog that features load (the adapted network's
# and the autoencoder import torch, where a search must not; the visual vocabulary is loaded by
# ``sift`` alone).
_NOT_FEATURES = ("decode", "ocr", "adapted_model", "autoencoder_model", "visual_vocabulary")


def _discover() -> None:
    """Import every module of this package once: each registers its feature on import."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in _NOT_FEATURES:
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def list_features(pattern: str = "*") -> list[str]:
    _discover()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def feature_spec(name: str) -> FeatureSpec:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFeatureError(f"unknown feature {name!r}; available: {', '.join(list_features())}") from None


def feature_weights(specs: Sequence[FeatureSpec], use: Literal["search", "classify"],
                    overrides: dict[str, float] | None = None, packshots: bool = False) -> dict[str, float]:
    """Each present feature's weight for ``use``, non-zero ones only.

    ``overrides`` replaces the registered defaults (names the catalog does not hold are an
    error). By default a feature with ``replaces`` set takes the place of that feature in each
    use where it has a weight of its own. ``packshots``: the catalog is one of packshots (most of
    its products one image), where fused search takes each feature's ``packshot_search_weight``
    where it has one.
    """
    present = {spec.name: spec for spec in specs}
    if overrides is not None:
        unknown = sorted(set(overrides) - set(present))
        if unknown:
            raise ValueError(f"no feature {', '.join(map(repr, unknown))} in this index; it has {', '.join(present)}")
        return {name: float(weight) for name, weight in overrides.items() if weight}

    def default(spec: FeatureSpec) -> float:
        if use == "classify":
            return spec.classify_weight
        return spec.packshot_search_weight if packshots and spec.packshot_search_weight is not None else (
            spec.search_weight)

    weights = {spec.name: default(spec) for spec in specs}
    for spec in specs:
        if spec.replaces and weights.get(spec.name):
            weights.pop(spec.replaces, None)
    return {name: weight for name, weight in weights.items() if weight}


T = TypeVar("T")


def options_of(catalog: Any, feature: str, options: type[T]) -> T:
    """``options`` (a dataclass) with the catalog's ``feature_options[feature]`` over its defaults;
    a setting it does not have is a ``ValueError`` naming the known ones."""
    import dataclasses

    overrides = dict(catalog.config.feature_options.get(feature, {}))
    known = {field.name for field in dataclasses.fields(options)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {feature} settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return options(**overrides)
