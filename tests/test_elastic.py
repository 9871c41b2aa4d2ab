"""Elasticsearch store: request bodies checked through the real client, and live scenarios.

The unit tests replace ``Elasticsearch.perform_request`` (below the client's parameter checks
and above the network), so they see the exact HTTP method, path and body the official client
would send. The integration tests need a server: set ``CATALENS_ES_URL``.
"""

from __future__ import annotations

import base64
import json
import os
import uuid

import numpy as np
import pytest
from elastic_transport import ApiResponseMeta, ConnectionError, HttpHeaders, NodeConfig
from elasticsearch import Elasticsearch

from datasets.catalog import CatalogItem
from indexer.elastic import (
    ElasticSettings,
    ElasticStore,
    category_filter,
    index_template,
    item_key,
    knn_body,
    words_body,
)
from indexer.stores import CatalogStore, EmbeddedStore, ItemUpdate, open_store
from tests.conftest import textured_label


class FakeServer:
    """Records every request the client makes and answers from a queue of canned bodies."""

    def __init__(self, monkeypatch):
        self.requests: list[tuple[str, str, object]] = []
        self.responses: list[object] = []
        self.existing: set[str] = set()
        # Answers requests when no canned response is queued: (method, path, body, params) -> body.
        self.route = None
        server = self

        def perform_request(client, method, path, *, params=None, headers=None, body=None, endpoint_id=None, path_parts=None):
            from elastic_transport import ObjectApiResponse

            server.requests.append((method, path, body))
            if method == "HEAD":
                from elastic_transport import HeadApiResponse

                status = 200 if path.strip("/") in server.existing else 404
                return HeadApiResponse(ApiResponseMeta(status, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "localhost", 9200)))
            if server.responses:
                answer = server.responses.pop(0)
            elif server.route is not None:
                answer = server.route(method, path, body, params or {})
            else:
                answer = {"acknowledged": True}
            if isinstance(answer, Exception):
                raise answer
            if callable(answer):
                answer = answer(body)
            meta = ApiResponseMeta(200, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "localhost", 9200))
            return ObjectApiResponse(body=answer, meta=meta)

        monkeypatch.setattr(Elasticsearch, "perform_request", perform_request)
        self.client = Elasticsearch("http://localhost:9200")


def bulk_ok(body):
    """A bulk response acknowledging every action of an NDJSON body."""
    lines = [json.loads(line) for line in body]
    items = []
    for line in lines:
        op = next(iter(line))
        if op in ("index", "delete", "update", "create"):
            items.append({op: {"_id": line[op]["_id"], "status": 200, "result": "ok"}})
    return {"took": 1, "errors": False, "items": items}


@pytest.fixture()
def server(monkeypatch):
    return FakeServer(monkeypatch)


def update(item_id: str, category: str = "Dairy/Milk", dim: int = 4, seed: int = 0) -> ItemUpdate:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return ItemUpdate(
        CatalogItem(item_id, f"/images/{item_id}.jpg", category, f"title {item_id}", {"brand": "Arla"}),
        "123:456", {"deep": vector / np.linalg.norm(vector)}, np.array([5, 7, 7]), b"\x00keypoints\xff",
    )


# --- generated mappings and query bodies


def test_index_template_maps_vectors_as_indexed_hnsw_cosine_dense_vectors():
    template = index_template({"deep": 1280, "ae": 64}, ElasticSettings(index="shop", shards=3))
    properties = template["template"]["mappings"]["properties"]
    for feature, dim in (("deep", 1280), ("ae", 64)):
        spec = properties[feature]
        assert spec["type"] == "dense_vector" and spec["dims"] == dim
        assert spec["index"] is True and spec["similarity"] == "cosine"
        assert spec["index_options"]["type"] == "hnsw"
    assert template["index_patterns"] == ["shop"]
    assert template["template"]["settings"]["number_of_shards"] == 3


def test_index_template_indexes_category_as_path_hierarchy_and_keeps_keypoints_unindexed():
    template = index_template({"deep": 8})["template"]
    properties = template["mappings"]["properties"]
    tree = properties["category"]["fields"]["tree"]
    analyzer = template["settings"]["analysis"]["analyzer"][tree["analyzer"]]
    tokenizer = template["settings"]["analysis"]["tokenizer"][analyzer["tokenizer"]]
    assert tokenizer == {"type": "path_hierarchy", "delimiter": "/"}
    # Queries must not be split into their own prefixes, or 'A/B' would also match all of 'A'.
    assert tree["search_analyzer"] == "keyword"
    assert properties["category"]["type"] == "keyword"  # aggregatable
    assert properties["keypoints"]["type"] == "binary"  # stored in _source, never indexed
    assert properties["words"]["analyzer"] == "whitespace"
    assert properties["title"]["type"] == "text" and properties["attributes"]["type"] == "flattened"


def test_category_filter_is_one_term_on_whole_path_levels():
    assert category_filter("/Packages/Milk/") == {"term": {"category.tree": "Packages/Milk"}}
    assert category_filter("") is None and category_filter(None) is None


def test_knn_body_filters_by_category_and_asks_for_more_candidates_than_k():
    body = knn_body("deep", np.ones(4, np.float32), 5, category="Fruit")
    assert body["knn"]["field"] == "deep" and body["knn"]["k"] == 5
    assert body["knn"]["num_candidates"] >= 5 * 4
    assert body["knn"]["filter"] == {"term": {"category.tree": "Fruit"}}
    assert "keypoints" not in body["source"] and "deep" not in body["source"]


def test_words_body_is_bool_should_of_terms_boosted_by_query_frequency():
    body = words_body(np.array([3, 9, 9, 9, 4]), 7, category="Dairy")
    should = body["query"]["bool"]["should"]
    assert should[0] == {"term": {"words": {"value": "w9", "boost": 3.0}}}
    assert {clause["term"]["words"]["value"] for clause in should} == {"w3", "w4", "w9"}
    assert body["query"]["bool"]["filter"] == [{"term": {"category.tree": "Dairy"}}]
    assert words_body(np.array([], np.int64), 7) is None


def test_item_key_is_a_stable_non_negative_int64():
    assert item_key("Fruit/Apple/1.jpg") == item_key("Fruit/Apple/1.jpg")
    assert item_key("a") != item_key("b")
    assert 0 <= item_key("x" * 500) < 2**63


# --- requests through the official client


def test_knn_search_request_reaches_the_search_endpoint_and_scores_come_back_as_cosine(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    server.responses.append({"hits": {"hits": [
        {"_score": 0.95, "_source": {"key": 11}}, {"_score": 0.5, "_source": {"key": 12}},
    ]}})
    scores, keys = store.knn("deep", np.ones((1, 4), np.float32), 3, category="Dairy")
    method, path, body = server.requests[0]
    assert (method, path) == ("POST", "/shop/_search")
    assert body["knn"]["filter"] == {"term": {"category.tree": "Dairy"}}
    assert body["knn"]["query_vector"] == [1.0, 1.0, 1.0, 1.0]
    assert keys.tolist() == [[11, 12, -1]]
    np.testing.assert_allclose(scores[0, :2], [0.9, 0.0], atol=1e-6)


def test_bulk_indexing_names_each_document_by_item_id_so_rewrites_replace(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    server.responses += [bulk_ok, bulk_ok]
    first = store.upsert_items([update("a"), update("b", seed=1)])
    again = store.upsert_items([update("a")])
    lines = [json.loads(line) for _, _, body in server.requests for line in body]
    actions = [line for line in lines if "index" in line]
    assert [action["index"]["_id"] for action in actions] == ["a", "b", "a"]
    assert all(action["index"]["_index"] == "shop" for action in actions)
    source = lines[1]
    assert source["id"] == "a" and source["key"] == item_key("a") and source["words"] == "w5 w7 w7"
    assert base64.b64decode(source["keypoints"]) == b"\x00keypoints\xff"
    assert len(source["deep"]) == 4
    assert first[0] == again[0] == item_key("a")


def test_bulk_chunk_is_retried_with_exponential_backoff_after_a_connection_error(server):
    sleeps: list[float] = []
    store = ElasticStore(server.client, ElasticSettings(index="shop"), initial_backoff=1.0, sleep=sleeps.append)
    server.responses += [ConnectionError("node restarting"), ConnectionError("node restarting"), bulk_ok]
    store.upsert_items([update("a")])
    assert sleeps == [1.0, 2.0]
    assert len(server.requests) == 3
    assert server.requests[0][2] == server.requests[2][2]  # the same idempotent chunk again


def test_bulk_gives_up_after_max_retries(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"), max_retries=2, sleep=lambda _: None)
    server.responses += [ConnectionError("down")] * 3
    with pytest.raises(ConnectionError):
        store.upsert_items([update("a")])


def test_deleting_an_absent_item_is_not_an_error_but_a_rejected_document_is(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    server.responses.append({"errors": True, "items": [{"delete": {"_id": "gone", "status": 404, "result": "not_found"}}]})
    assert store.delete_items(["gone", "gone"]) == [item_key("gone")]
    server.responses.append({"errors": True, "items": [{"index": {"_id": "a", "status": 400, "error": {"type": "mapper_parsing_exception"}}}]})
    with pytest.raises(RuntimeError, match="rejected 1 document"):
        store.upsert_items([update("a")])


def test_ensure_index_puts_the_template_then_creates_the_index(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    store.ensure_index({"deep": 8})
    paths = [(method, path) for method, path, _ in server.requests]
    assert paths == [("HEAD", "/shop"), ("PUT", "/_index_template/shop"), ("PUT", "/shop")]
    template = server.requests[1][2]
    assert template["template"]["mappings"]["properties"]["deep"]["dims"] == 8


def test_keypoints_are_fetched_for_the_requested_candidates_only(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    blob = base64.b64encode(b"kp").decode()
    server.responses.append({"hits": {"hits": [{"_source": {"key": 3, "keypoints": blob}}]}})
    assert store.keypoints([3, 4]) == {3: b"kp"}
    _, path, body = server.requests[0]
    assert body["query"] == {"terms": {"key": [3, 4]}}
    assert body["_source"] == ["key", "keypoints"] and body["size"] == 2


def test_categories_come_from_a_terms_aggregation(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    server.responses.append({"hits": {"hits": []}, "aggregations": {"categories": {"buckets": [{"key": "Dairy/Milk", "doc_count": 4}]}}})
    assert store.categories() == {"Dairy/Milk": 4}
    assert server.requests[0][2]["aggs"]["categories"]["terms"]["field"] == "category"


def test_open_store_picks_elasticsearch_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CATALENS_ES_URL", "http://localhost:9200")
    store = open_store(tmp_path)
    assert isinstance(store, ElasticStore) and store.index == "catalens"
    monkeypatch.delenv("CATALENS_ES_URL")
    with pytest.raises(ValueError, match="needs --es-url"):
        open_store(tmp_path, backend="es")
    with pytest.raises(ValueError, match="unknown backend"):
        open_store(tmp_path, backend="solr")


@pytest.mark.slow
def test_embedded_store_satisfies_the_store_protocol_and_filters_by_category(grocery_index):
    from indexer.index import CatalogIndex

    index = CatalogIndex.open(grocery_index)
    try:
        store = EmbeddedStore(index)
        assert isinstance(store, CatalogStore)
        keys, vectors = index.store.vectors("deep", store.dims()["deep"])
        category = index.store.items([int(keys[0])])[int(keys[0])].category.split("/")[0]
        scores, found = store.knn("deep", vectors[:1], 5, category=category)
        assert found[0, 0] == keys[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
        records = store.items(found[0][found[0] >= 0])
        assert all(record.category.startswith(category) for record in records.values())
        assert store.item_by_id(records[int(keys[0])].id).key == keys[0]
    finally:
        index.close()


# --- integration: the embedded store's scenarios against a live cluster

ES_URL = os.environ.get("CATALENS_ES_URL")
needs_es = pytest.mark.skipif(not ES_URL, reason="CATALENS_ES_URL is not set: no Elasticsearch to test against")


@pytest.fixture()
def live_store():
    store = ElasticStore.connect(ES_URL, index=f"catalens-test-{uuid.uuid4().hex[:8]}")
    yield store
    store.client.indices.delete(index=store.index, ignore_unavailable=True)
    store.client.indices.delete_index_template(name=store.index)


@pytest.mark.es
@needs_es
def test_es_index_search_filter_delete_and_resume(live_store, tiny_catalog, tmp_path):
    from datasets.catalog import load_catalog
    from indexer.config import IndexConfig
    from indexer.elastic import index_catalog_to_elastic

    config = IndexConfig(commit_every=4, extra={"local": {"vocab_size": 64}})
    models = tmp_path / "models"
    items = load_catalog(tiny_catalog)
    report = index_catalog_to_elastic(items, live_store, config, progress=False, models_dir=models)
    assert report.added == len(items) and not report.failures
    assert live_store.count() == len(items)
    # every item with keypoints has words of the vocabulary fitted on them
    from indexer.local import VOCAB_FILE, VisualVocabulary

    vocabulary, _ = VisualVocabulary.load(models / VOCAB_FILE)
    assert live_store.local_items() and not live_store.local_items(exclude_vocabulary=vocabulary.id_)

    # search: an indexed image finds itself first; a category filter keeps to whole levels
    from indexer.deep import DeepFeatureExtractor
    from indexer.imageio import load_rgb

    extractor = DeepFeatureExtractor(config.backbone, runtime=config.runtime)
    vector = extractor.transform_images([load_rgb(items[0].image)])
    scores, keys = live_store.knn("deep", vector, 3)
    assert keys[0, 0] == item_key(items[0].id) and scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    top = items[0].category.split("/")[0]
    _, keys = live_store.knn("deep", vector, 12, category=top)
    records = live_store.items(keys[0][keys[0] >= 0])
    assert records and all(r.category.split("/")[0] == top for r in records.values())
    assert set(live_store.categories()) == {item.category for item in items}

    # every search mode runs unchanged against the cluster, with and without a category filter
    from indexer.elastic import ElasticIndexView
    from search.engine import SearchEngine

    view = ElasticIndexView(live_store, config, models_dir=models)
    for mode in ("deep", "local", "fused", "ae"):
        if mode == "ae" and "ae" not in live_store.dims():
            continue
        for category in (None, top):
            [result] = SearchEngine(view).search([items[0].image], k=3, mode=mode, category=category)
            assert result.results[0].id == items[0].id, (mode, category)
            assert category is None or all(hit.category.split("/")[0] == top for hit in result.results)

    # words: a bag-of-words query finds the item whose words it shares
    # (word ids past the 64-word vocabulary: no other item has them)
    live_store.upsert_items([ItemUpdate(items[1], "x", {"deep": vector[0]}, np.array([1000, 1001, 1001]), b"kp")])
    live_store.refresh()
    found, _ = live_store.word_candidates(np.array([1001, 1001, 9999]), 5)
    assert found[0] == item_key(items[1].id)
    assert live_store.keypoints([item_key(items[1].id)]) == {item_key(items[1].id): b"kp"}

    # resume: a second run extracts nothing and duplicates nothing (item 1 has a stale fingerprint)
    again = index_catalog_to_elastic(items, live_store, config, progress=False, models_dir=models)
    assert again.extracted == 1 and live_store.count() == len(items)
    assert not live_store.local_items(exclude_vocabulary=vocabulary.id_)  # item 1 re-quantised
    [result] = SearchEngine(view).search([items[1].image], k=3, mode="local")
    assert result.results[0].id == items[1].id

    # delete, twice: idempotent; pruning by a shorter catalog removes the rest
    live_store.delete_items([items[0].id])
    live_store.delete_items([items[0].id])
    live_store.refresh()
    assert live_store.item_by_id(items[0].id) is None and live_store.count() == len(items) - 1
    for mode in ("deep", "local", "fused"):
        [result] = SearchEngine(view).search([items[0].image], k=5, mode=mode)
        assert items[0].id not in [hit.id for hit in result.results], mode
    pruned = index_catalog_to_elastic(items[:5], live_store, config, progress=False, models_dir=models)
    assert pruned.removed == len(items) - 5 and live_store.count() == 5


@pytest.mark.es
@needs_es
def test_es_autoencoder_audit_scores_and_ae_search_match_the_embedded_store(live_store, tiny_catalog, tmp_path):
    """The anomaly scenario on a live cluster: index (colour included), train-ae, audit, score, --mode ae."""
    from datasets.catalog import load_catalog
    from indexer.config import IndexConfig
    from indexer.elastic import ElasticIndexView, index_catalog_to_elastic
    from indexer.index import CatalogIndex
    from indexer.pipeline import index_catalog
    from search.anomaly import audit_catalog, score_anomalies
    from search.engine import SearchEngine

    _blocky_noise(tiny_catalog / "Fruit/Apple/zz_noise.png")
    config = IndexConfig(local_features=False)
    items = load_catalog(tiny_catalog)
    index_catalog_to_elastic(items, live_store, config, progress=False, models_dir=tmp_path / "es-models")
    assert live_store.dims()["colour"] == 192 and len(live_store.feature_keys("colour")) == len(items)
    index_catalog(items, tmp_path / "index", config, progress=False)
    view = ElasticIndexView(live_store, config, models_dir=tmp_path / "es-models")
    index = CatalogIndex.open(tmp_path / "index")
    try:
        _tiny_ae(view), _tiny_ae(index)
        on_cluster, embedded = audit_catalog(view), audit_catalog(index)
        assert [entry.id for entry in on_cluster] == [entry.id for entry in embedded]
        np.testing.assert_allclose([e.score for e in on_cluster], [e.score for e in embedded], rtol=1e-4)
        query = str(items[3].image)
        [cluster_result], [embedded_result] = score_anomalies(view, [query]), score_anomalies(index, [query])
        assert cluster_result.score == pytest.approx(embedded_result.score, rel=1e-4)
        [found] = SearchEngine(view).search([query], k=3, mode="ae")
        assert found.results[0].id == items[3].id and found.results[0].score == pytest.approx(1.0, abs=1e-3)
    finally:
        index.close()


def test_recommended_factory_grows_from_exact_to_reranked_ivfpq_with_catalog_size():
    import faiss

    from indexer.stores import recommended_factory, recommended_search_parameters

    assert recommended_factory(50_000, 1280) == "Flat"
    assert recommended_factory(1_000_000, 1280) == "IVF4096_HNSW32,PQ64,Refine(SQ8)"
    large = recommended_factory(20_000_000, 1280)
    assert large.startswith("IVF16384") and "PQ" in large
    index = faiss.index_factory(64, large.replace("PQ64", "PQ16"), faiss.METRIC_INNER_PRODUCT)
    faiss.ParameterSpace().set_index_parameters(index, recommended_search_parameters(large))
    assert faiss.extract_index_ivf(index).nprobe == 16 and faiss.downcast_index(index).k_factor == 30


def test_search_engine_runs_deep_mode_against_elasticsearch_through_the_index_view(server, tmp_path):
    from PIL import Image

    from indexer.elastic import ElasticIndexView
    from search.engine import SearchEngine

    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    store._dims = {"deep": 4}
    view = ElasticIndexView(store, models_dir=tmp_path)

    class FakeExtractor:
        def transform_images(self, images):
            return np.ones((len(images), 4), np.float32) / 2

    view._cache["deep_extractor"] = FakeExtractor()
    shards = {"total": 1, "successful": 1, "skipped": 0, "failed": 0}
    server.responses += [
        {"_scroll_id": "s1", "_shards": shards, "hits": {"hits": [{"_source": {"key": 11}}, {"_source": {"key": 12}}]}},
        {"_scroll_id": "s1", "_shards": shards, "hits": {"hits": []}},
        {"succeeded": True},
        {"hits": {"hits": [{"_score": 1.0, "_source": {"key": 12}}, {"_score": 0.75, "_source": {"key": 11}}]}},
        {"hits": {"hits": [
            {"_source": {"key": 11, "id": "a", "category": "Dairy/Milk", "title": "A"}},
            {"_source": {"key": 12, "id": "b", "category": "Dairy/Yoghurt", "title": "B"}},
        ]}},
    ]
    [result] = SearchEngine(view).search([Image.new("RGB", (32, 32))], k=2, mode="deep", category="Dairy")
    assert [(hit.id, round(hit.score, 3)) for hit in result.results] == [("b", 1.0), ("a", 0.5)]
    knn = next(body for _, _, body in server.requests if body and "knn" in body)["knn"]
    # The engine resolves the category to keys first; the kNN query filters on the category
    # path, not on a list of keys that grows with the category.
    assert knn["filter"] == {"term": {"category.tree": "Dairy"}}


def test_backend_arguments_reach_open_store(monkeypatch, tmp_path):
    import argparse

    from indexer.stores import add_backend_arguments

    monkeypatch.delenv("CATALENS_ES_URL", raising=False)
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    args = parser.parse_args(["--backend", "es", "--es-url", "http://es.example:9200"])
    store = open_store(tmp_path, args.backend, args.es_url)
    assert isinstance(store, ElasticStore)
    with pytest.raises(Exception, match="no catalens index here"):
        open_store(tmp_path / "absent", *vars(parser.parse_args([])).values())


# --- local and fused search against Elasticsearch, through an in-memory cluster


class MiniCluster:
    """Just enough of one Elasticsearch index, in memory, for catalens' requests.

    It evaluates the query shapes catalens sends (term, terms, exists, bool, kNN, scroll,
    bulk index/update/delete, update-by-query), so a whole indexing run and searches in every
    mode can go through the official client; each request stays in ``server.requests`` to be
    checked. Documents are held to the index's strict mapping as a server holds them.
    """

    def __init__(self, server: FakeServer, index: str = "shop"):
        self.server, self.index = server, index
        self.docs: dict[str, dict] = {}
        self.properties: dict[str, dict] = {}
        server.route = self.answer

    # query evaluation

    def matches(self, source: dict, query: dict) -> bool:
        kind, spec = next(iter(query.items()))
        if kind == "match_all":
            return True
        if kind == "exists":
            return source.get(spec["field"]) is not None
        if kind == "terms":
            field, values = next(iter(spec.items()))
            return source.get(field) in values
        if kind == "term":
            field, value = next(iter(spec.items()))
            value = value["value"] if isinstance(value, dict) else value
            if field == "category.tree":  # path_hierarchy: whole levels of the path
                category = source.get("category", "")
                return category == value or category.startswith(value + "/")
            if field == "words":
                return value in source.get("words", "").split()
            return source.get(field) == value
        if kind == "bool":
            if not all(self.matches(source, q) for q in _as_list(spec.get("filter", []))):
                return False
            if any(self.matches(source, q) for q in _as_list(spec.get("must_not", []))):
                return False
            should = spec.get("should", [])
            return not should or any(self.matches(source, q) for q in should)
        raise AssertionError(f"MiniCluster does not know the {kind!r} query")

    def score(self, source: dict, query: dict) -> float:
        """Term queries on words: boost x term frequency, summed (BM25 without idf or norms)."""
        tokens = source.get("words", "").split()
        total = 0.0
        for clause in query.get("bool", {}).get("should", []):
            term = clause["term"]["words"]
            total += term["boost"] * tokens.count(term["value"])
        return total or 1.0

    def search(self, body: dict, params: dict) -> dict:
        fields = body.get("_source", True)

        def hit(item_id, score):
            source = self.docs[item_id]
            kept = source if fields is True else {f: source[f] for f in fields if f in source}
            return {"_id": item_id, "_score": score, "_source": kept}

        if "knn" in body:
            knn = body["knn"]
            query = np.asarray(knn["query_vector"], np.float32)
            scored = []
            for item_id, source in self.docs.items():
                if knn["field"] in source and ("filter" not in knn or self.matches(source, knn["filter"])):
                    vector = np.asarray(source[knn["field"]], np.float32)
                    cosine = float(vector @ query / (np.linalg.norm(vector) * np.linalg.norm(query)))
                    scored.append(((1 + cosine) / 2, item_id))
            scored.sort(reverse=True)
            return {"hits": {"hits": [hit(i, sc) for sc, i in scored[: knn["k"]]]}}
        query = body.get("query", {"match_all": {}})
        found = [(self.score(source, query), item_id) for item_id, source in self.docs.items() if self.matches(source, query)]
        found.sort(key=lambda pair: -pair[0])
        size = len(found) if "scroll" in params or "scroll" in body else body.get("size", 10)
        answer = {"hits": {"hits": [hit(i, sc) for sc, i in found[:size]]}}
        if "scroll" in params or "scroll" in body:
            answer.update({"_scroll_id": "all", "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}})
        if "aggs" in body:
            counts: dict[str, int] = {}
            for source in self.docs.values():
                counts[source["category"]] = counts.get(source["category"], 0) + 1
            answer["aggregations"] = {"categories": {"buckets": [{"key": c, "doc_count": n} for c, n in counts.items()]}}
        return answer

    def rejection(self, fields: dict) -> dict | None:
        """The error a strict mapping gives for these document fields, or None."""
        for name, value in fields.items():
            spec = self.properties.get(name)
            if spec is None:
                return {"type": "strict_dynamic_mapping_exception", "reason": f"[{name}] is not mapped"}
            if spec["type"] == "dense_vector" and len(value) != spec["dims"]:
                return {"type": "document_parsing_exception", "reason": f"[{name}] has {len(value)} dims, not {spec['dims']}"}
            if spec["type"] == "float" and not isinstance(value, int | float):
                return {"type": "document_parsing_exception", "reason": f"[{name}] is not a number"}
        return None

    def bulk(self, body) -> dict:
        lines = [json.loads(line) for line in body]
        items, position = [], 0
        while position < len(lines):
            op, meta = next(iter(lines[position].items()))
            item_id = meta["_id"]
            error = None
            if op == "delete":
                status = 200 if self.docs.pop(item_id, None) is not None else 404
                position += 1
            else:
                payload = lines[position + 1]
                position += 2
                # An update's line is {"doc": partial document}; an index op's is the document.
                assert op == "index" or set(payload) == {"doc"}, payload
                error = self.rejection(payload if op == "index" else payload["doc"])
                if error is not None:
                    status = 400
                elif op == "index":
                    self.docs[item_id], status = payload, 200
                elif item_id in self.docs:
                    self.docs[item_id].update(payload["doc"])
                    status = 200
                else:
                    status = 404
            items.append({op: {"_id": item_id, "status": status, **({"error": error} if error else {})}})
        return {"took": 1, "errors": any(i[next(iter(i))]["status"] >= 300 for i in items), "items": items}

    def update_by_query(self, body: dict, params: dict) -> dict:
        """Runs the one script catalens sends: remove a field from the matching documents."""
        script = body["script"]
        assert script["source"] == "ctx._source.remove(params.field)" and script.get("lang", "painless") == "painless"
        assert body.get("conflicts", params.get("conflicts")) == "proceed"  # the client sends it in the body
        matching = [source for source in self.docs.values() if self.matches(source, body.get("query", {"match_all": {}}))]
        for source in matching:
            source.pop(script["params"]["field"], None)
        return {"total": len(matching), "updated": len(matching), "version_conflicts": 0, "failures": []}

    def answer(self, method: str, path: str, body, params: dict):
        parts = path.strip("/").split("/")
        if path == "/_bulk":
            return self.bulk(body)
        if path == "/_search/scroll":
            return {"succeeded": True} if method == "DELETE" else {"_scroll_id": "all", "hits": {"hits": []}}
        if parts[:2] == ["_index_template", self.index]:
            self.properties.update(body["template"]["mappings"]["properties"])
            return {"acknowledged": True}
        if parts == [self.index] and method == "PUT":
            self.server.existing.add(self.index)
            return {"acknowledged": True}
        if parts == [self.index, "_mapping"]:
            if method == "PUT":
                self.properties.update(body["properties"])
                return {"acknowledged": True}
            return {self.index: {"mappings": {"properties": self.properties}}}
        if parts == [self.index, "_search"]:
            return self.search(body or {}, params)
        if parts == [self.index, "_update_by_query"] and method == "POST":
            return self.update_by_query(body, params)
        if parts == [self.index, "_count"]:
            return {"count": len(self.docs)}
        if parts == [self.index, "_refresh"]:
            return {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if parts[:2] == [self.index, "_doc"] and method == "GET":
            from elasticsearch import NotFoundError

            if parts[2] not in self.docs:
                meta = ApiResponseMeta(404, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "localhost", 9200))
                raise NotFoundError("not found", meta, {"found": False})
            return {"_id": parts[2], "found": True, "_source": self.docs[parts[2]]}
        raise AssertionError(f"MiniCluster: unexpected {method} {path}")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def on_cluster(server: FakeServer) -> tuple[MiniCluster, ElasticStore]:
    """An in-memory cluster and a store of its index ("shop") that retries without sleeping."""
    return MiniCluster(server), ElasticStore(server.client, ElasticSettings(index="shop"), sleep=lambda _: None)


class ColourFeature:
    """A stand-in deep feature (no network): mean colour of 4 quadrants, L2-normalised."""

    name, dim, draft_size = "deep", 12, 0

    @staticmethod
    def preparer(image):
        array = np.asarray(image.convert("RGB").resize((64, 64)), np.float32)
        return np.concatenate([q.mean(axis=(0, 1)) for r in np.split(array, 2) for q in np.split(r, 2, axis=1)])

    def finish(self, prepared):
        rows = np.stack(prepared).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def transform_images(self, images):
        return self.finish([self.preparer(image) for image in images])


@pytest.fixture()
def es_catalog(tmp_path):
    from datasets.catalog import CatalogItem

    items = []
    for number in range(8):
        category = ["Packages/Milk", "Packages/Juice", "Fruit/Apple", "Fruit/Pear"][number % 4]
        path = tmp_path / "catalog" / f"{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_label(number).save(path, quality=95)
        items.append(CatalogItem(f"item{number}", path, category, f"item {number}", {}))
    return items


def _es_local_config():
    from indexer.config import IndexConfig

    return IndexConfig(num_workers=0, commit_every=3, extra={"local": {"vocab_size": 64}})


def _index_into(cluster_store, items, models_dir):
    from indexer.elastic import index_catalog_to_elastic
    from indexer.local import LocalConfig, SiftFeature

    config = _es_local_config()
    features = [ColourFeature(), SiftFeature(LocalConfig(vocab_size=64))]
    return index_catalog_to_elastic(items, cluster_store, config, features=features, progress=False, models_dir=models_dir)


def _searches(server):
    return [body for method, path, body in server.requests if path.endswith("/_search") and body]


def test_local_features_are_indexed_into_elasticsearch_with_words_of_a_vocabulary_fitted_on_them(server, es_catalog, tmp_path):
    from indexer.local import VOCAB_FILE, VisualVocabulary

    cluster, store = on_cluster(server)
    report = _index_into(store, es_catalog, tmp_path / "models")
    assert report.added == len(es_catalog) and not report.failures
    vocabulary, extra = VisualVocabulary.load(tmp_path / "models" / VOCAB_FILE)
    assert vocabulary.size == 64 and int(extra["fitted_on"]) == len(es_catalog)
    for source in cluster.docs.values():
        assert source["words_vocab"] == vocabulary.id_
        assert len(source["words"].split()) > 50  # one word per keypoint
    assert cluster.properties["words_vocab"] == {"type": "keyword"}

    # resume: nothing extracted, nothing re-quantised; a new item alone gets its words
    server.requests.clear()
    again = _index_into(store, es_catalog, tmp_path / "models")
    assert again.extracted == 0 and again.unchanged == len(es_catalog)
    assert not [line for _, path, body in server.requests if path == "/_bulk" for line in body]
    extra_item = es_catalog[0].__class__("item9", es_catalog[1].image, "Fruit/Pear", "copy", {})
    server.requests.clear()
    grown = _index_into(store, [*es_catalog, extra_item], tmp_path / "models")
    assert grown.added == 1
    updates = [json.loads(line) for _, path, body in server.requests if path == "/_bulk" for line in body]
    assert [line["update"]["_id"] for line in updates if "update" in line] == ["item9"]
    assert cluster.docs["item9"]["words"] == cluster.docs["item1"]["words"]


def _engine(server, cluster_store, models_dir):
    from indexer.elastic import ElasticIndexView
    from search.engine import SearchEngine

    view = ElasticIndexView(cluster_store, _es_local_config(), models_dir=models_dir)
    view._cache["deep_extractor"] = ColourFeature()
    return SearchEngine(view)


def _crop(image):
    width, height = image.size
    return image.crop((width // 5, height // 5, 4 * width // 5, 4 * height // 5)).resize((300, 300))


@pytest.mark.parametrize("mode", ["local", "fused"])
def test_local_and_fused_modes_run_against_elasticsearch_with_term_queries_and_few_keypoint_fetches(server, es_catalog, tmp_path, mode):
    from search.local import LocalSearchConfig

    cluster, store = on_cluster(server)
    _index_into(store, es_catalog, tmp_path / "models")
    engine = _engine(server, store, tmp_path / "models")
    server.requests.clear()
    [result] = engine.search([_crop(textured_label(5))], k=3, mode=mode)
    assert result.results[0].id == "item5"
    if mode == "local":
        assert result.results[0].score >= LocalSearchConfig().min_inliers  # geometrically verified

    searches = _searches(server)
    [words] = [body for body in searches if "should" in body.get("query", {}).get("bool", {})]
    clauses = words["query"]["bool"]["should"]
    assert all(set(c["term"]["words"]) == {"value", "boost"} and c["term"]["words"]["value"].startswith("w") for c in clauses)
    assert words["_source"] == ["key"]
    fetches = [body for body in searches if body.get("_source") == ["key", "keypoints"]]
    fetched = [key for body in fetches for key in body["query"]["terms"]["key"]]
    # Keypoints of the verified candidates only, each once, never a scan of the catalog.
    assert fetched and len(fetched) == len(set(fetched)) <= 2 * LocalSearchConfig().verify_top
    assert len(fetched) <= len(cluster.docs)
    knn = [body for body in searches if "knn" in body]
    assert bool(knn) == (mode == "fused")


@pytest.mark.parametrize("mode", ["deep", "local", "fused"])
def test_category_filter_reaches_the_elasticsearch_queries_of_every_mode(server, es_catalog, tmp_path, mode):
    _, store = on_cluster(server)
    _index_into(store, es_catalog, tmp_path / "models")
    engine = _engine(server, store, tmp_path / "models")
    server.requests.clear()
    [result] = engine.search([_crop(textured_label(5))], k=4, mode=mode, category="Packages")
    assert result.results and all(hit.category.startswith("Packages/") for hit in result.results)
    filters = [body["knn"]["filter"] if "knn" in body else body["query"]["bool"]["filter"]
               for body in _searches(server) if "knn" in body or "should" in body.get("query", {}).get("bool", {})]
    assert filters and all(f in ({"term": {"category.tree": "Packages"}}, [{"term": {"category.tree": "Packages"}}]) for f in filters)


def test_keys_of_a_category_filter_by_its_path_but_a_subset_of_them_by_key(server):
    from indexer.elastic import CategoryKeys

    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    keys = CategoryKeys([3, 5, 8], "Dairy")
    server.responses += [{"hits": {"hits": []}}] * 2
    store.knn("deep", np.ones(4, np.float32), 2, keys=keys)
    store.knn("deep", np.ones(4, np.float32), 2, keys=keys[:2])
    assert server.requests[0][2]["knn"]["filter"] == {"term": {"category.tree": "Dairy"}}
    assert server.requests[1][2]["knn"]["filter"] == {"terms": {"key": [3, 5]}}


def test_local_mode_on_elasticsearch_without_a_vocabulary_says_so(server, tmp_path):
    from PIL import Image

    _, store = on_cluster(server)
    engine = _engine(server, store, tmp_path / "models")
    with pytest.raises(ValueError, match="no local features"):
        engine.search([Image.new("RGB", (64, 64))], k=3, mode="local")


def test_word_scores_from_elasticsearch_are_relative_to_the_best_hit(server):
    store = ElasticStore(server.client, ElasticSettings(index="shop"))
    server.responses.append({"hits": {"hits": [{"_score": 8.0, "_source": {"key": 1}}, {"_score": 2.0, "_source": {"key": 2}}]}})
    keys, scores = store.word_candidates(np.array([1, 2]), 5, keys=np.array([1, 2, 3]))
    assert keys.tolist() == [1, 2] and scores.tolist() == [1.0, 0.25]
    assert server.requests[0][2]["query"]["bool"]["filter"] == [{"terms": {"key": [1, 2, 3]}}]


def test_classify_runs_against_elasticsearch_through_the_index_view(server, es_catalog, tmp_path):
    """Classification fits on the cluster's stored vectors: the same code as on the embedded index."""
    from PIL import Image

    from search.classify import classify

    _, store = on_cluster(server)
    _index_into(store, es_catalog, tmp_path / "models")
    keys, rows = store.vectors("deep", 12)
    assert len(keys) == len(es_catalog) and rows.shape == (len(es_catalog), 12) and list(keys) == sorted(keys)
    view = _engine(server, store, tmp_path / "models").index
    [result] = classify(view, [Image.open(es_catalog[2].image)])
    assert result.error is None and result.category == es_catalog[2].category
    assert result.neighbours[0] == es_catalog[2].id


# --- feature rows, written as code for the embedded store writes them (autoencoder, audit)


def test_feature_rows_are_buffered_then_sent_as_partial_updates_named_by_item_id(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4, "ae": 3})
    store.upsert_items([update("a"), update("b", seed=1)])
    a, b = item_key("a"), item_key("b")
    code = np.array([0.6, 0.0, 0.8], np.float32)
    server.requests.clear()
    with store.transaction() as rows:
        store.put_feature(rows, "ae", a, code.tobytes())
        store.put_feature(rows, "ae_score", a, np.float32(2.5).tobytes())
        store.put_feature(rows, "ae_score", b, np.float32(0.0).tobytes())
        assert not [path for _, path, _ in server.requests if path == "/_bulk"]  # nothing before the block ends
    lines = [json.loads(line) for _, path, body in server.requests if path == "/_bulk" for line in body]
    assert lines == [
        {"update": {"_index": "shop", "_id": "a"}}, {"doc": {"ae": code.tolist(), "ae_score": 2.5}},
        {"update": {"_index": "shop", "_id": "b"}}, {"doc": {"ae_score": 0.0}},
    ]
    assert cluster.docs["a"]["deep"] and cluster.docs["a"]["words"] == "w5 w7 w7"  # the rest of the document stays
    # Read back as the embedded store keeps them: float32 bytes by key, a zero score included.
    assert store.feature_blobs("ae") == {a: code.tobytes()}
    assert store.feature_blobs("ae_score", [a, b]) == {a: np.float32(2.5).tobytes(), b: np.float32(0.0).tobytes()}
    assert store.feature_keys("ae_score") == {a, b} and store.keypoints([b]) == {b: b"\x00keypoints\xff"}
    assert [record.id for record in store.all_items()] == [r.id for r in sorted(store.records().values(), key=lambda r: r.key)]


def test_a_feature_row_transaction_that_raises_sends_nothing_and_unmapped_rows_are_refused(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4})
    store.upsert_items([update("a")])
    with pytest.raises(KeyError), store.transaction() as rows:
        store.put_feature(rows, "ae_score", item_key("a"), np.float32(1.0).tobytes())
        raise KeyError("interrupted")
    assert "ae_score" not in cluster.docs["a"]
    with pytest.raises(ValueError, match="not mapped"), store.transaction() as rows:
        store.put_feature(rows, "deep_ft", item_key("a"), np.ones(4, np.float32).tobytes())
    # A vector of the wrong size is refused by the cluster's mapping, as a real one refuses it.
    with pytest.raises(RuntimeError, match="rejected 1 document"), store.transaction() as rows:
        store.put_feature(rows, "deep", item_key("a"), np.ones(3, np.float32).tobytes())
    # Rows of an item deleted meanwhile are dropped, not sent to fail.
    server.requests.clear()
    with store.transaction() as rows:
        store.put_feature(rows, "ae_score", item_key("gone"), np.float32(1.0).tobytes())
    assert not [path for _, path, _ in server.requests if path == "/_bulk"]


def test_deleting_a_feature_removes_its_field_from_every_document_with_one_update_by_query(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4})
    store.upsert_items([update("a"), update("b", seed=1)])
    with store.transaction() as rows:
        store.put_feature(rows, "ae_score", item_key("a"), np.float32(1.0).tobytes())
    server.requests.clear()
    store.delete_feature("ae_score")
    [(method, path, body)] = server.requests
    assert (method, path) == ("POST", "/shop/_update_by_query")
    assert body["query"] == {"exists": {"field": "ae_score"}}
    assert body["script"]["params"] == {"field": "ae_score"}
    assert not store.feature_keys("ae_score") and all("deep" in source for source in cluster.docs.values())
    store.delete_feature("ae_score")  # again: nothing matches, nothing fails


# --- the autoencoder and anomaly scores on Elasticsearch, as on the embedded store


def _blocky_noise(path):
    """A clearly foreign image: blocky colour noise (per-pixel noise averages to grey at 64 px)."""
    from PIL import Image

    blocks = np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((256, 256), Image.NEAREST).save(path)
    return path


def _product_updates(folder) -> list[ItemUpdate]:
    """Twelve generated products and one noise image, with stand-in deep vectors (no network)."""
    from PIL import Image

    from indexer.pipeline import file_fingerprint
    from tests.conftest import draw_product

    paths = [draw_product(folder / f"item{n:02d}.jpg", seed=n, text=f"item {n}") for n in range(12)]
    paths.append(_blocky_noise(folder / "zz_noise.png"))
    vectors = ColourFeature().transform_images([Image.open(path) for path in paths])
    categories = ["Dairy/Milk", "Dairy/Yoghurt", "Fruit/Apple"]
    return [
        ItemUpdate(CatalogItem(path.name, path, categories[n % 3], path.stem, {}), file_fingerprint(path), {"deep": vector})
        for n, (path, vector) in enumerate(zip(paths, vectors, strict=True))
    ]


def _tiny_ae(index, **overrides):
    from indexer.autoencoder import train_index_autoencoder

    settings = {"epochs": 4, "input_kind": "pixels", "progress": False, "width": 8, "code_channels": 4, **overrides}
    return train_index_autoencoder(index, **settings)


@pytest.fixture()
def es_and_embedded(server, tmp_path):
    """The same catalog in the in-memory cluster (the cluster, its view) and in an embedded index."""
    from indexer.config import IndexConfig
    from indexer.elastic import ElasticIndexView
    from indexer.index import CatalogIndex

    updates = _product_updates(tmp_path / "catalog")
    config = IndexConfig(local_features=False, num_workers=0)
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": ColourFeature.dim})
    store.upsert_items(updates)
    index = CatalogIndex.create(tmp_path / "index", config)
    EmbeddedStore(index).upsert_items(updates)
    index.save()
    yield cluster, ElasticIndexView(store, config, models_dir=tmp_path / "es-models"), index
    index.close()


def test_autoencoder_trained_on_elasticsearch_scores_and_audits_as_on_the_embedded_store(server, es_and_embedded, tmp_path):
    from search.anomaly import audit_catalog, score_anomalies
    from search.engine import SearchEngine

    cluster, view, index = es_and_embedded
    cluster_model, embedded_model = _tiny_ae(view), _tiny_ae(index)
    # The same catalog and seed train the same model whichever store holds the catalog.
    assert cluster_model.loss_history_ == pytest.approx(embedded_model.loss_history_, rel=1e-5)
    assert (view.models_dir / "autoencoder.pt").is_file() and view.meta["dims"]["ae"] == 4 * 4 * 4
    assert all(len(doc["ae"]) == 64 and isinstance(doc["ae_score"], float) for doc in cluster.docs.values())

    on_cluster, embedded = audit_catalog(view), audit_catalog(index)
    assert [entry.id for entry in on_cluster] == [entry.id for entry in embedded]
    np.testing.assert_allclose([e.score for e in on_cluster], [e.score for e in embedded], rtol=1e-4)
    ranks = [entry.id for entry in on_cluster]
    assert ranks.index("zz_noise.png") < len(ranks) // 2  # the foreign image ranks high on both

    queries = [str(tmp_path / "catalog" / "item03.jpg"), str(_blocky_noise(tmp_path / "query.png"))]
    cluster_scores = [r.score for r in score_anomalies(view, queries)]
    np.testing.assert_allclose(cluster_scores, [r.score for r in score_anomalies(index, queries)], rtol=1e-4)
    assert cluster_scores[1] > cluster_scores[0]

    # --mode ae: kNN on the codes in their dense_vector field finds the item itself, as FAISS does.
    [found] = SearchEngine(view).search([queries[0]], k=3, mode="ae")
    [local] = SearchEngine(index).search([queries[0]], k=3, mode="ae")
    assert found.results[0].id == "item03.jpg" and found.results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [hit.id for hit in found.results] == [hit.id for hit in local.results]
    knn = [body["knn"] for _, path, body in server.requests if path == "/shop/_search" and body and "knn" in body]
    assert knn[-1]["field"] == "ae" and len(knn[-1]["query_vector"]) == 64


def test_the_audit_on_elasticsearch_scores_items_added_since_training_and_stores_their_scores(server, es_and_embedded, tmp_path):
    from search.anomaly import audit_catalog

    _, view, _ = es_and_embedded
    _tiny_ae(view, epochs=2)
    extra = _product_updates(tmp_path / "more")[0]
    extra.item = CatalogItem("late.jpg", extra.item.image, "Fruit/Apple", "late", {})
    view.store.upsert_items([extra])
    view.store.refresh()
    assert item_key("late.jpg") not in view.store.feature_keys("ae_score")
    entries = audit_catalog(view)
    assert len(entries) == 14 and "late.jpg" in {entry.id for entry in entries}
    assert item_key("late.jpg") in view.store.feature_keys("ae_score")  # scored once, kept


def test_retraining_on_elasticsearch_with_another_code_size_is_refused_before_the_codes_go(server, es_and_embedded):
    _, view, _ = es_and_embedded
    _tiny_ae(view, epochs=1)
    before = view.store.feature_blobs("ae")
    with pytest.raises(ValueError, match="keeps its dims"):
        _tiny_ae(view, epochs=1, code_channels=2, fresh=True)
    assert view.store.feature_blobs("ae") == before


def test_train_ae_and_anomaly_commands_take_the_elasticsearch_backend(server, es_and_embedded, tmp_path, monkeypatch, capsys):
    from api.cli import main

    monkeypatch.setenv("CATALENS_ES_INDEX", "shop")
    monkeypatch.setenv("CATALENS_ES_MODELS", str(tmp_path / "cli-models"))
    monkeypatch.setenv("CATALENS_NUM_WORKERS", "0")
    backend = ["--backend", "es", "--es-url", "http://localhost:9200"]
    query = str(tmp_path / "catalog" / "item00.jpg")
    assert main(["anomaly", query, *backend]) == 2
    assert "train-ae" in capsys.readouterr().err
    assert main(["train-ae", *backend, "--epochs", "2", "--input", "pixels", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and str(tmp_path / "cli-models" / "autoencoder_loss.png") in out
    assert main(["anomaly", query, *backend, "--json"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(line) == {"query", "score", "threshold", "anomalous"}
    # The environment alone picks the cluster, as for index and search.
    monkeypatch.setenv("CATALENS_ES_URL", "http://localhost:9200")
    assert main(["anomaly", "--audit", "--top", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(line["id"].endswith((".jpg", ".png")) for line in lines)


def test_top_block_finetune_and_classify_take_the_elasticsearch_backend(server, es_and_embedded, tmp_path, monkeypatch, capsys):
    """finetune --top-block maps deep_ft on the cluster before writing it; classify then reads it there."""
    from api.cli import main

    cluster, _, _ = es_and_embedded
    monkeypatch.setenv("CATALENS_ES_INDEX", "shop")
    monkeypatch.setenv("CATALENS_ES_MODELS", str(tmp_path / "cli-models"))
    monkeypatch.setenv("CATALENS_NUM_WORKERS", "0")
    backend = ["--backend", "es", "--es-url", "http://localhost:9200"]
    assert main(["finetune", *backend]) == 2
    assert "--top-block" in capsys.readouterr().err  # the projection head needs a folder index
    assert main(["finetune", *backend, "--top-block", "--epochs", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == len(cluster.docs) == 13 and report["categories"] == 3
    assert all(len(doc["deep_ft"]) == 1280 for doc in cluster.docs.values())
    assert (tmp_path / "cli-models" / "top_block.pt").is_file()
    query = str(tmp_path / "catalog" / "item04.jpg")
    assert main(["classify", query, *backend, "--json"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The query's own catalog photo is its nearest support item: queries and support share deep_ft.
    assert line["neighbours"][0] == "item04.jpg" and line["category"].split("/")[0] in {"Dairy", "Fruit", "unknown"}


# --- indexing into Elasticsearch extracts the embedded pipeline's features


def _index_products(store, items, models_dir, monkeypatch, **config):
    """Index ``items`` with the pipeline's features (a stand-in deep one, no network)."""
    from indexer.config import IndexConfig
    from indexer.elastic import ElasticIndexView, index_catalog_to_elastic

    monkeypatch.setattr(ElasticIndexView, "deep_extractor", lambda view: ColourFeature())
    config = IndexConfig(local_features=False, num_workers=0, **config)
    return index_catalog_to_elastic(items, store, config, progress=False, models_dir=models_dir)


def test_indexing_into_elasticsearch_writes_the_colour_feature_and_fills_it_in_on_older_indexes(server, tmp_path, monkeypatch):
    from indexer.colour import ColourHistogram

    cluster, store = on_cluster(server)
    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    report = _index_products(store, items, tmp_path / "models", monkeypatch, colour_features=False)
    assert report.added == len(items) and "colour" not in store.dims()
    # An index from before the colour feature: the next run extracts every item again, as locally.
    again = _index_products(store, items, tmp_path / "models", monkeypatch)
    assert again.extracted == again.updated == len(items) and not again.unchanged
    assert store.dims()["colour"] == ColourHistogram.dim == 192
    assert cluster.properties["colour"]["similarity"] == "cosine"
    keys, rows = store.vectors("colour", 192)  # what classification fits on
    assert len(keys) == len(items)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    third = _index_products(store, items, tmp_path / "models", monkeypatch)
    assert third.extracted == 0 and third.unchanged == len(items)


def test_items_indexed_into_elasticsearch_after_training_get_autoencoder_codes(server, tmp_path, monkeypatch):
    from indexer.elastic import ElasticIndexView

    cluster, store = on_cluster(server)
    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    _index_products(store, items, tmp_path / "models", monkeypatch, colour_features=False)
    _tiny_ae(ElasticIndexView(store, models_dir=tmp_path / "models"), epochs=1)
    late = CatalogItem("late.jpg", items[0].image, "Fruit/Apple", "late", {})
    report = _index_products(store, [*items, late], tmp_path / "models", monkeypatch, colour_features=False)
    assert report.added == report.extracted == 1  # the others have their codes from training
    # The same image, the same code (training coded float16 copies of the inputs: nearly the same).
    assert np.dot(cluster.docs["late.jpg"]["ae"], cluster.docs[items[0].id]["ae"]) == pytest.approx(1.0, abs=1e-4)
    assert "ae_score" not in cluster.docs["late.jpg"] and "ae_score" in cluster.docs[items[0].id]


def test_items_indexed_into_elasticsearch_after_top_block_finetuning_get_deep_ft_rows(server, tmp_path, monkeypatch):
    from indexer.elastic import ElasticIndexView
    from indexer.finetune_top import finetune_top_block

    cluster, store = on_cluster(server)
    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    _index_products(store, items, tmp_path / "models", monkeypatch, colour_features=False)
    finetune_top_block(ElasticIndexView(store, models_dir=tmp_path / "models"), epochs=1, progress=False)
    late = CatalogItem("late.jpg", items[0].image, "Fruit/Apple", "late", {})
    report = _index_products(store, [*items, late], tmp_path / "models", monkeypatch, colour_features=False)
    assert report.added == report.extracted == 1  # the others have their rows from fine-tuning
    # The same image, the same row (fine-tuning read float16 copies of the trunk maps: nearly the same).
    assert np.dot(cluster.docs["late.jpg"]["deep_ft"], cluster.docs[items[0].id]["deep_ft"]) == pytest.approx(1.0, abs=1e-3)
