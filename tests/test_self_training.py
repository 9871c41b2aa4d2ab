"""Self-training on a shop's unlabeled photos (``finetune --unlabeled``), and the slice of the
catalog that finetune keeps from training for judging it and fitting the match confidence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalens.datasets import CatalogError, read_photo_list
from catalens.indexer.features import l2_normalise
from catalens.indexer.training.pseudo_labels import (
    balanced_assignment,
    beside_colour,
    name_shop_photos,
    select_pseudo_labels,
    toward_shop_photos,
)


@pytest.fixture()
def tiny_index(tiny_catalog, tmp_path):
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    index_catalog(tiny_catalog, tmp_path / "index", IndexConfig(), progress=False)
    return tmp_path / "index"


def _clusters(rng: np.random.Generator, centres: np.ndarray, per: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(centres)), per)
    return l2_normalise(centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1]))), labels


def test_balanced_assignment_spreads_photos_that_one_prototype_would_absorb():
    rng = np.random.default_rng(0)
    centres = l2_normalise(rng.normal(size=(4, 16)))
    photos, truth = _clusters(rng, centres, 25, 0.3)
    # Every photo looks a little more like product 0's packshot than its own product does.
    prototypes = l2_normalise(centres + 0.9 * centres[0])
    plain = (photos @ prototypes.T).argmax(axis=1)
    balanced = balanced_assignment(photos @ prototypes.T).argmax(axis=1)
    assert np.allclose(balanced_assignment(photos @ prototypes.T).sum(axis=1), 1.0)
    assert (plain == truth).mean() < (balanced == truth).mean()
    assert np.bincount(balanced, minlength=4).min() >= 15  # each product gets about its share


def test_pseudo_labels_keep_the_surest_share_of_each_products_photos():
    rng = np.random.default_rng(1)
    centres = l2_normalise(rng.normal(size=(3, 8)))
    photos, truth = _clusters(rng, centres, 20, 0.8)
    half = select_pseudo_labels(photos, centres, share=0.5)
    most = select_pseudo_labels(photos, centres, share=0.9)
    assert set(half.rows) < set(most.rows)
    assert len(half.rows) == pytest.approx(30, abs=3) and set(np.unique(half.labels)) == {0, 1, 2}
    # the surer half is righter than everything
    assert (half.labels == truth[half.rows]).mean() >= (most.labels == truth[most.rows]).mean()
    empty = select_pseudo_labels(np.zeros((0, 8)), centres, 0.5)
    assert len(empty.rows) == 0


def test_items_move_toward_their_products_shop_photos_and_a_shop_photo_then_finds_them():
    """A packshot (axis 0 or 1) and its product's shop photos (mostly axis 2 or 3) are far apart;
    after the move a new shop photo of product A is nearer A's item than B's; without photos, rows stay."""
    rng = np.random.default_rng(0)
    items = l2_normalise(np.eye(6, dtype=np.float32)[[0, 0, 1, 4]] + rng.normal(0, 0.05, (4, 6)).astype(np.float32))
    products = np.array(["A", "A", "B", "C"])
    # Shop photos: A's lean on axis 2, B's on axis 3; each is nearer its own packshot than the other.
    photos = l2_normalise(np.vstack([np.eye(6)[0] * 0.5 + np.eye(6)[2] + rng.normal(0, 0.05, (1, 6)) for _ in range(8)]
                                    + [np.eye(6)[1] * 0.5 + np.eye(6)[3] + rng.normal(0, 0.05, (1, 6)) for _ in range(8)]
                                    + [np.eye(6)[4] * 0.5 + np.eye(6)[5] + rng.normal(0, 0.05, (1, 6)) for _ in range(8)]
                                    ).astype(np.float32))
    query = l2_normalise((np.eye(6)[2] + 0.3 * np.eye(6)[3])[None].astype(np.float32))[0]
    named = name_shop_photos(items, products, photos, share=0.5)
    moved, n = toward_shop_photos(items, products, photos, named, own_weight=0.3)
    assert n == 3 and moved.shape == items.shape and np.allclose(np.linalg.norm(moved, axis=1), 1, atol=1e-5)
    assert float(query @ items[0]) < 0.1 < float(query @ moved[0])  # before: A's packshot nowhere near
    assert float(query @ moved[0]) > float(query @ moved[2])  # after: A before B
    assert np.allclose(moved[0], moved[0] @ moved[1] * moved[0], atol=0.1)  # A's items moved alike
    unmoved, n = toward_shop_photos(items, products, photos[:0], name_shop_photos(items, products, photos[:0], 0.5),
                                    own_weight=0.3)
    assert n == 0 and np.allclose(unmoved, items, atol=1e-6)
    kept_all, _ = toward_shop_photos(items, products, photos, named, own_weight=1.0)
    assert np.allclose(kept_all, items, atol=1e-6)


class _ExemplarCatalog:
    """What ``exemplar_cosines`` reads of a catalog: the feature's kept exemplars and the items."""

    def __init__(self, exemplars, records):
        from types import SimpleNamespace

        self._feature = SimpleNamespace(shop_exemplars=lambda: exemplars)
        self.items = SimpleNamespace(records=lambda: {record.id: record for record in records})

    def feature(self, name):
        return self._feature

    def cached(self, name, build, stamp=None):
        return build()


def test_items_score_by_the_mean_of_their_products_nearest_shop_exemplars_within_the_filter():
    from types import SimpleNamespace

    from catalens.indexer.stores import ItemFilter, ItemRecord
    from catalens.search import retrieval

    rng = np.random.default_rng(0)
    rows = l2_normalise(rng.normal(size=(30, 8)).astype(np.float32))
    products = np.array(["apple"] * 12 + ["pear"] * 9 + ["lime"] * 9)
    records = [ItemRecord(1, "a", "a.jpg", "Fruit/Apple", "", {"product": "apple"}),
               ItemRecord(2, "p", "p.jpg", "Fruit/Pear", "", {"product": "pear"}),
               ItemRecord(3, "m", "m.jpg", "Dairy/Milk", "")]  # no exemplars: not scored by them
    query_vector = l2_normalise(rng.normal(size=(1, 8)).astype(np.float32))[0]
    query = SimpleNamespace(vector=lambda catalog, feature: query_vector, computed=lambda catalog, name, build: build())
    catalog = _ExemplarCatalog((rows, products), records)
    scored = retrieval.exemplar_cosines(catalog, query, "deep_ft")
    k = retrieval.EXEMPLAR_NEIGHBOURS
    expected = {key: float(np.sort(rows[products == name] @ query_vector)[-k:].mean())
                for key, name in ((1, "apple"), (2, "pear"))}
    assert scored.keys() == expected.keys()
    assert all(scored[key] == pytest.approx(expected[key], abs=1e-5) for key in expected)
    assert retrieval.exemplar_cosines(catalog, query, "deep_ft", ItemFilter(category="Fruit/Pear")).keys() == {2}
    assert retrieval.exemplar_cosines(catalog, query, "deep_ft", ItemFilter(keys=np.array([1, 3]))).keys() == {1}
    assert retrieval.exemplar_cosines(catalog, query, "deep_ft", ItemFilter(category="Fruit/Pe")) == {}
    assert retrieval.exemplar_cosines(_ExemplarCatalog(None, records), query, "deep_ft") is None


def test_finetune_with_unlabeled_photos_on_a_catalog_of_packshots_keeps_shop_exemplars_that_search_scores_by(
        tmp_path, capsys, monkeypatch):
    """One image a product: finetune keeps the shop photos it named surest with the network, and
    search in ``deep_ft`` scores each item by its product's nearest ones."""
    from catalens.api.cli import main
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.estimator import saved_state
    from catalens.indexer.features.deep_ft import ADAPTED_NETWORK
    from catalens.indexer.imageio import load_query
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores import product_of
    from catalens.indexer.stores.backends import open_catalog
    from catalens.indexer.training import adaptation
    from catalens.search import retrieval
    from catalens.search.engine import Query, SearchEngine
    from tests.conftest import draw_product

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)
    root = tmp_path / "catalog"
    for i in range(6):
        draw_product(root / ["Dairy", "Fruit"][i % 2] / f"product{i}" / "packshot.jpg", seed=i, text=f"p{i}")
    index_catalog(root, tmp_path / "index", IndexConfig(), progress=False)
    shelf = tmp_path / "shelf"
    for i in range(12):
        draw_product(shelf / f"shot{i}.jpg", seed=i % 6, text=f"p{i % 6}", size=300)
    assert main(["finetune", "--index", str(tmp_path / "index"), "--steps", "3", "--json", "--unlabeled",
                 str(shelf)]) == 0
    kept = json.loads(capsys.readouterr().out)["shop_exemplars"]
    assert 6 <= kept <= 12
    catalog = open_catalog(tmp_path / "index")
    try:
        state = saved_state(ADAPTED_NETWORK.path(catalog), "AdaptedTop")
        rows, products = np.asarray(state["exemplars"], np.float32), np.asarray(state["exemplar_products"], str)
        assert rows.shape == (kept, catalog.dims()["deep_ft"]) and len(products) == kept
        assert set(products) <= {product_of(record) for record in catalog.items.records().values()}
        query = Query(load_query(shelf / "shot0.jpg"), "shot0")
        keys, scores = SearchEngine(catalog).rank_products(query, "deep_ft", 6)
        vector = query.vector(catalog, "deep_ft")
        records = catalog.items.items(keys.tolist())
        k = retrieval.EXEMPLAR_NEIGHBOURS
        checked = 0
        for key, score in zip(keys.tolist(), scores.tolist(), strict=True):
            mine = rows[products == product_of(records[key])]
            if len(mine):  # scored by its product's nearest exemplars, not by its own row
                assert score == pytest.approx(float(np.sort(mine @ vector)[-k:].mean()), abs=2e-3)
                checked += 1
        assert checked >= 1
    finally:
        catalog.close()


def test_photos_the_network_cannot_tell_apart_are_named_by_their_colour_beside_it():
    """Two products whose shop photos embed alike (Golden Delicious, Granny Smith) but differ in
    colour: named by the embedding alone about half are wrong; with the colour beside it, all are
    right, and the items move toward their own product's photos."""
    rng = np.random.default_rng(0)
    shared = l2_normalise(rng.normal(size=(1, 8)))
    items = l2_normalise(shared + 0.3 * l2_normalise(rng.normal(size=(2, 8))))
    products = np.array(["golden", "granny"])
    yellow, green = np.eye(4)[0] + 0.2, np.eye(4)[1] + 0.2
    item_colour = l2_normalise(np.vstack([yellow, green]))
    # Twenty photos of each, embedded at random around the shared point: nearer either packshot by chance.
    photos = l2_normalise(shared + 0.3 * rng.normal(size=(40, 8)))
    truth = np.repeat([0, 1], 20)
    photo_colour = l2_normalise(np.vstack([yellow, green])[truth] + 0.05 * rng.random((40, 4)))
    plain = select_pseudo_labels(photos, items, share=1.0)
    named = select_pseudo_labels(beside_colour(photos, photo_colour, 0.3),
                                 beside_colour(items, item_colour, 0.3), share=1.0)
    assert (plain.labels == truth[plain.rows]).mean() < 0.8
    assert (named.labels == truth[named.rows]).mean() == 1.0
    both = beside_colour(photos, photo_colour, 0.3)
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0)
    assert np.allclose(both[0] @ both[1], (photos[0] @ photos[1] + 0.3 * photo_colour[0] @ photo_colour[1]) / 1.3)
    # Moved toward the photos the colour named: each item's row toward its own product's photos.
    named = name_shop_photos(beside_colour(items, item_colour, 0.3), products, both, share=1.0)
    moved, n = toward_shop_photos(items.astype(np.float32), products, photos.astype(np.float32), named, 0.3)
    golden_mean, granny_mean = l2_normalise(photos[:20].sum(0, keepdims=True)), l2_normalise(photos[20:].sum(0, keepdims=True))
    assert n == 2
    assert float(moved[0] @ golden_mean[0]) > float(moved[0] @ granny_mean[0])
    assert float(moved[1] @ granny_mean[0]) > float(moved[1] @ golden_mean[0])


def test_unlabeled_photos_are_read_from_a_folder_or_a_list_file(tmp_path):
    from tests.conftest import draw_product

    folder = tmp_path / "shelf"
    for i in range(3):
        draw_product(folder / "aisle" / f"p{i}.jpg", seed=i)
    (folder / "notes.txt").write_text("not a photo")
    assert [p.name for p in read_photo_list(folder)] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    listing = tmp_path / "photos.txt"
    listing.write_text(f"# shelf photos\nshelf/aisle/p1.jpg\n\n{folder / 'aisle' / 'p2.jpg'}\n")
    assert read_photo_list(listing) == [folder / "aisle" / "p1.jpg", folder / "aisle" / "p2.jpg"]
    for bad, reason in ((tmp_path / "missing", "no such folder or file"), (tmp_path / "empty", "no photos found")):
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(CatalogError, match=reason) as raised:
            read_photo_list(bad)
        assert str(bad) in str(raised.value)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00photo.jpg")
    with pytest.raises(CatalogError, match="UTF-8"):
        read_photo_list(tmp_path / "binary.txt")


def test_finetune_with_unlabeled_photos_self_trains_on_them(tiny_index, tiny_catalog, tmp_path, capsys, monkeypatch):
    from catalens.api.cli import main
    from catalens.indexer.training import adaptation
    from tests.conftest import draw_product

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)  # kept whatever it measures: this checks the plumbing
    named_with = []  # the colour rows the photos and items were named with, beside the adapted rows

    def recording_beside_colour(rows, colour, weight):
        named_with.append(colour.shape)
        return beside_colour(rows, colour, weight)

    monkeypatch.setattr(adaptation, "beside_colour", recording_beside_colour)
    shelf = tmp_path / "shelf"
    for i in range(6):
        draw_product(shelf / f"shot{i}.jpg", seed=100 + i)
    assert main(["finetune", "--index", str(tiny_index), "--steps", "3", "--json", "--unlabeled", str(shelf)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unlabeled"] == 6 and 1 <= report["pseudo_labelled"] <= 6 and report["kept"]
    assert report["toward_shop_photos"] >= 1 and report["shop_exemplars"] == 0  # four images a product
    # Every round of naming and the move toward the photos used the six photos' colour histograms.
    assert named_with.count((6, 192)) == len(adaptation.PSEUDO_SHARES) + 1
    # The stored rows are the network's moved toward the shop photos, not what it makes of the items alone.
    from catalens.indexer.features import embed
    from catalens.indexer.imageio import load_query
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(tiny_index)
    try:
        records = sorted(catalog.items.records().values(), key=lambda record: record.key)
        stored = catalog.items.rows("deep_ft", [record.key for record in records])
        network = embed(catalog.feature("deep_ft"), [load_query(record.image) for record in records])
        similarity = [float(np.frombuffer(stored[r.key], np.float32) @ network[i]) for i, r in enumerate(records)]
        assert min(similarity) < 0.999
    finally:
        catalog.close()
    assert main(["finetune", "--index", str(tiny_index), "--unlabeled", str(tmp_path / "nothing")]) == 2
    assert "--unlabeled" in capsys.readouterr().err


def _colour_rows(index) -> dict[int, np.ndarray]:
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        return {key: np.frombuffer(row, np.float32) for key, row in catalog.items.rows("colour").items()}
    finally:
        catalog.close()


def test_finetune_with_unlabeled_photos_moves_the_colour_rows_and_a_finetune_without_puts_them_back(
        tiny_index, tmp_path, capsys, monkeypatch):
    """And the audit reads no moved row: each is 70% its product's, so it agrees with whatever the
    item is filed under (planted misfilings on grocery: 9% found first with them, 95% without)."""
    from catalens.api.cli import main
    from catalens.indexer.training import adaptation
    from catalens.search.audit.rows import CatalogRows
    from tests.conftest import draw_product

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)
    shelf = tmp_path / "shelf"
    for i in range(6):
        draw_product(shelf / f"shot{i}.jpg", seed=100 + i)
    indexed = _colour_rows(tiny_index)
    assert main(["finetune", "--index", str(tiny_index), "--steps", "3", "--json", "--unlabeled", str(shelf)]) == 0
    assert json.loads(capsys.readouterr().out)["colour_moved"]
    moved = _colour_rows(tiny_index)
    assert moved.keys() == indexed.keys()
    assert min(float(moved[key] @ indexed[key]) for key in indexed) < 0.99  # toward the shelf's colours
    assert all(np.isclose(np.linalg.norm(row), 1.0, atol=1e-4) for row in moved.values())
    # Fused search reads the moved rows from the vector index, not only the item store.
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(tiny_index)
    try:
        key = next(iter(moved))
        scores, keys = catalog.vectors("colour").search(moved[key][None], 1)
        assert int(keys[0][0]) == key and scores[0][0] == pytest.approx(1.0, abs=1e-4)
        assert set(CatalogRows.from_catalog(catalog).rows) == {"deep"}
    finally:
        catalog.close()

    assert main(["finetune", "--index", str(tiny_index), "--steps", "3", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["colour_moved"]
    put_back = _colour_rows(tiny_index)
    assert min(float(put_back[key] @ indexed[key]) for key in indexed) > 0.999
    catalog = open_catalog(tiny_index)
    try:
        assert set(CatalogRows.from_catalog(catalog).rows) == {"deep_ft", "colour"}
    finally:
        catalog.close()


def test_finetune_holds_photos_out_with_their_near_duplicates_and_calibration_asks_only_those(tmp_path, monkeypatch):
    """Products of several photos: about a tenth of each is kept from training, a photo with its
    near-duplicates; the model stores what it trained on; calibration's photo queries are the others."""
    from catalens.indexer.training import adaptation

    class Record:
        def __init__(self, key: int):
            self.key = key

    class FakeItems:
        def rows(self, name):
            return {key: vector.astype(np.float32).tobytes() for key, vector in vectors.items()}

    class FakeCatalog:
        items = FakeItems()

        def dims(self):
            return {"deep": 32}

    rng = np.random.default_rng(0)
    base = l2_normalise(rng.normal(size=(2, 32)))
    vectors, labels, records = {}, [], []
    for product in range(2):
        for shot in range(20):
            key = 100 * product + shot
            # shots 0-4 of each product are one burst (near-duplicates); the rest are spread out
            vectors[key] = base[product] + (0.01 if shot < 5 else 1.0) * rng.normal(size=32)
            records.append(Record(key))
            labels.append(f"p{product}")
    held = adaptation._held_out_slice(FakeCatalog(), records, np.array(labels), np.random.default_rng(3))
    burst = [{100 * p + s for s in range(5)} for p in range(2)]
    held_keys = {records[i].key for i in held}
    for product in range(2):
        mine = {k for k in held_keys if k // 100 == product}
        assert 2 <= len(mine) <= 18  # a tenth at least, never all but one
        assert not (mine & burst[product]) or burst[product] <= mine  # a burst goes out whole or not at all
        assert not (mine & burst[product])  # photos without twins go first: the burst stays in training
        assert len(mine) == 2  # a tenth of 20, not the burst's 5
    small = adaptation._held_out_slice(FakeCatalog(), records[:2], np.array(labels[:2]), rng)
    assert small == set()  # a product of two photos trains on both


def test_calibration_queries_after_finetune_are_photos_the_network_never_trained_on(tiny_index, monkeypatch):
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.calibration import fitting

    catalog = open_catalog(tiny_index)
    try:
        keys = sorted(record.key for record in catalog.items.records().values())
        untrained = set(keys[:4])
        monkeypatch.setattr(fitting, "_untrained_keys", lambda catalog: untrained)
        queries = fitting.calibration_queries(catalog, max_queries=24)
        photo_queries = [q for q in queries if q.kind in ("held-out photo", "absent product")]
        assert photo_queries
        by_id = {record.id: record.key for record in catalog.items.records().values()}
        assert all(by_id[q.query.name] in untrained for q in photo_queries)
        assert all(q.kind == "augmented view" for q in queries if q.query.name.endswith("(augmented)"))
    finally:
        catalog.close()
