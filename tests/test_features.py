"""Features by registry: what the configuration lists is extracted, stored and searchable by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catalens.indexer.config import IndexConfig
from catalens.indexer.features import (
    UnknownFeatureError,
    feature_spec,
    feature_weights,
    l2_normalise,
    list_features,
    register_feature,
)
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import SearchEngine


def test_the_registry_lists_every_feature_module_with_its_kind():
    assert {"deep", "colour", "sift", "style", "ae", "deep_ft"} <= set(list_features())
    assert feature_spec("sift").kind == "local" and feature_spec("style").kind == "global"
    assert feature_spec("ae").fitted_by == "catalens train-ae"
    with pytest.raises(UnknownFeatureError, match="unknown feature 'texture'; available: ae"):
        feature_spec("texture")


def test_default_weights_let_a_fitted_feature_stand_in_where_it_has_a_weight():
    specs = [feature_spec(name) for name in ("deep", "colour", "sift")]
    assert feature_weights(specs, "search") == {"deep": 1.0, "colour": 0.3, "sift": 0.2}
    assert feature_weights(specs, "classify") == {"deep": 1.0, "colour": 0.6}
    adapted = [*specs, feature_spec("deep_ft")]  # what finetune adds: it stands in for deep in both
    assert feature_weights(adapted, "search") == {"colour": 0.3, "sift": 0.2, "deep_ft": 1.0}
    assert feature_weights(adapted, "classify") == {"colour": 0.6, "deep_ft": 1.0}
    assert feature_weights(specs, "search", {"deep": 1.0, "colour": 0.0}) == {"deep": 1.0}
    # A catalog of packshots: a verified label match weighs more against a descriptor that has one
    # image a product to be near; classification and explicit weights are the same.
    assert feature_weights(adapted, "search", packshots=True) == {"colour": 0.3, "sift": 0.5, "deep_ft": 1.0}
    assert feature_weights(adapted, "classify", packshots=True) == {"colour": 0.6, "deep_ft": 1.0}
    assert feature_weights(specs, "search", {"deep": 1.0, "sift": 0.2}, packshots=True) == {"deep": 1.0, "sift": 0.2}


def test_fused_search_weighs_sift_more_where_most_products_have_one_image(tmp_path):
    from catalens.search.calibration import features_read
    from catalens.search.ranking import is_packshot_catalog
    from tests.conftest import draw_product

    root = tmp_path / "catalog"
    for number, leaf in enumerate(["Milk/Arla", "Milk/Garant", "Juice/Bravo", "Juice/Tropicana", "Juice/Tropicana"]):
        draw_product(root / leaf / f"item{number}.jpg", seed=number, text=f"item {number}")
    config = IndexConfig(num_workers=0)
    index_catalog(root, tmp_path / "idx", config, progress=False)
    catalog = open_catalog(tmp_path / "idx")
    try:  # three of four products one packshot each
        assert is_packshot_catalog(catalog) and SearchEngine(catalog).weights()["sift"] == 0.5
        as_packshots = features_read(catalog)
    finally:
        catalog.close()
    for number, leaf in enumerate(["Milk/Arla", "Juice/Bravo"]):  # shelf photos: now one of four
        draw_product(root / leaf / f"shelf{number}.jpg", seed=10 + number, text=f"shelf {number}")
    index_catalog(root, tmp_path / "idx", config, progress=False)
    catalog = open_catalog(tmp_path / "idx")
    try:
        assert not is_packshot_catalog(catalog) and SearchEngine(catalog).weights()["sift"] == 0.2
        # A match calibration fitted on the packshots read other fused scores: it is stale.
        assert features_read(catalog) != as_packshots
    finally:
        catalog.close()


class MeanColour:
    """A toy global feature defined outside catalens: the image's mean RGB."""

    name, dim, draft_size = "mean_rgb", 3, 64

    @staticmethod
    def preparer(image: Image.Image) -> np.ndarray:
        return np.asarray(image, np.float32).reshape(-1, 3).mean(axis=0)

    def finish(self, prepared):
        return l2_normalise(np.stack(prepared)) if prepared else np.zeros((0, 3), np.float32)


def test_a_registered_feature_is_indexed_and_searchable_by_its_name_from_configuration_alone(
        tiny_catalog, tmp_path, monkeypatch):
    from catalens.indexer import features

    monkeypatch.setitem(features._REGISTRY, "mean_rgb", None)  # the registration is undone after the test
    register_feature("mean_rgb", "global", dim=3)(lambda catalog: MeanColour())
    config = IndexConfig(num_workers=0, features=["deep", "style", "mean_rgb"])
    index_catalog(tiny_catalog, tmp_path / "idx", config, progress=False)
    catalog = open_catalog(tmp_path / "idx")
    try:
        assert catalog.dims()["mean_rgb"] == 3 and catalog.vectors("mean_rgb").ntotal == 12
        assert catalog.dims()["style"] == feature_spec("style").build(catalog).dim
        engine = SearchEngine(catalog)
        assert {"fused", "deep", "style", "mean_rgb"} <= set(engine.modes()) and "local" not in engine.modes()
        query = sorted(tiny_catalog.rglob("*.jpg"))[4]
        for mode in ("style", "mean_rgb"):
            top = engine.search([query], k=1, mode=mode)[0].results[0]
            assert top.id.endswith(query.name) and top.score == pytest.approx(1.0, abs=1e-4)
    finally:
        catalog.close()


def test_colour_rows_of_a_photos_windows_are_those_of_their_crops():
    from catalens.indexer.features import WindowEmbedder, embed
    from catalens.indexer.features.colour import ColourHistogram

    rng = np.random.default_rng(3)
    # Four flat-coloured quarters with noise: each window's histogram is its quarter's colour.
    photo = np.zeros((400, 600, 3), np.uint8)
    for (y, x), colour in zip([(0, 0), (0, 300), (200, 0), (200, 300)],
                              [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 40)], strict=True):
        photo[y : y + 200, x : x + 300] = colour
    image = Image.fromarray(np.clip(photo + rng.integers(-20, 20, photo.shape), 0, 255).astype(np.uint8))
    windows = [(0, 0, 200, 200), (350, 0, 550, 200), (50, 200, 250, 400), (380, 180, 580, 380), (0, 0, 400, 400)]
    feature = ColourHistogram()
    assert isinstance(feature, WindowEmbedder)
    from_windows = feature.window_rows(image, windows)
    from_crops = embed(feature, [image.crop(window) for window in windows])
    assert from_windows.shape == (5, feature.dim)
    assert np.all(np.sum(from_windows * from_crops, axis=1) > 0.98)
    # ...and tell the quarters apart as their crops do.
    assert np.array_equal((from_windows @ from_crops.T).argmax(axis=1), np.arange(5))
    assert feature.window_rows(image, []).shape == (0, feature.dim)
