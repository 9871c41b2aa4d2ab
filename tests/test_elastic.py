"""Elasticsearch backend: request bodies checked through the real client, and live scenarios.

The unit tests replace ``Elasticsearch.perform_request`` (below the client's parameter checks
and above the network), so they see the exact HTTP method, path and body the official client
would send. ``MiniCluster`` answers them as one index would, so whole indexing runs, searches,
classification, training and the command line run against it. The integration tests need a
server: set ``CATALENS_ES_URL``.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import uuid

import numpy as np
import pytest
from elastic_transport import ApiResponseMeta, ConnectionError, HttpHeaders, NodeConfig
from elasticsearch import Elasticsearch

from catalens.datasets.catalog import CatalogItem
from catalens.indexer.catalog import IndexUnavailableError
from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores import (
    ItemFilter,
    ItemStore,
    ItemUpdate,
    VectorStore,
    WordIndex,
    item_key,
    vectors_of,
)
from catalens.indexer.stores.backends import open_catalog
from catalens.indexer.stores.elastic.catalog import (
    ElasticCatalog,
    elastic_location,
    parse_location,
)
from catalens.indexer.stores.elastic.items import REMOVE_FIELDS, ElasticItemStore
from catalens.indexer.stores.elastic.mapping import (
    ElasticSettings,
    category_filter,
    index_template,
    knn_body,
    words_body,
)
from catalens.search.engine import SearchEngine
from catalens.search.settings import SearchSettings
from tests.conftest import textured_label

KEYPOINTS = b"\x00keypoints\xff"


class FakeServer:
    """Records every request the client makes and answers from a queue of canned bodies."""

    def __init__(self, monkeypatch):
        self.requests: list[tuple[str, str, object]] = []
        self.params: list[dict] = []  # the query-string parameters of each request, in step with ``requests``
        self.responses: list[object] = []
        self.existing: set[str] = set()
        # Answers requests when no canned response is queued: (method, path, body, params) -> body.
        self.route = None
        server = self

        def perform_request(client, method, path, *, params=None, headers=None, body=None, endpoint_id=None, path_parts=None):
            from elastic_transport import HeadApiResponse, ObjectApiResponse

            server.requests.append((method, path, body))
            server.params.append(dict(params or {}))
            if method == "HEAD":
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
            # Through the wire: the caller never holds the server's own objects.
            return ObjectApiResponse(body=json.loads(json.dumps(answer)), meta=meta)

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


def bulk_lines(server: FakeServer) -> list[dict]:
    return [json.loads(line) for _, path, body in server.requests if path == "/_bulk" for line in body]


@pytest.fixture()
def server(monkeypatch):
    return FakeServer(monkeypatch)


def shop(server: FakeServer, **options) -> ElasticItemStore:
    """The item store of index "shop" through the fake server's client."""
    return ElasticItemStore(server.client, ElasticSettings(index="shop"), **options)


def update(item_id: str, category: str = "Dairy/Milk", dim: int = 4, seed: int = 0) -> ItemUpdate:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return ItemUpdate(
        CatalogItem(item_id, f"/images/{item_id}.jpg", category, f"title {item_id}", {"brand": "Arla"}),
        "123:456", {"deep": vector / np.linalg.norm(vector), "sift": KEYPOINTS},
    )


# --- generated mappings and query bodies


def test_index_template_maps_vectors_as_indexed_hnsw_cosine_dense_vectors():
    template = index_template({"deep": 1280, "ae": 64}, settings=ElasticSettings(index="shop", shards=3))
    properties = template["template"]["mappings"]["properties"]
    for feature, dim in (("deep", 1280), ("ae", 64)):
        spec = properties[feature]
        assert spec["type"] == "dense_vector" and spec["dims"] == dim
        assert spec["index"] is True and spec["similarity"] == "cosine"
        assert spec["index_options"]["type"] == "hnsw"
    assert template["index_patterns"] == ["shop"]
    assert template["template"]["settings"]["number_of_shards"] == 3
    assert template["template"]["mappings"]["dynamic"] == "strict"  # a misspelt field is refused, not mapped


def test_index_template_indexes_category_as_path_hierarchy_and_keeps_keypoints_unindexed():
    template = index_template({"deep": 8}, ["sift"])["template"]
    properties = template["mappings"]["properties"]
    tree = properties["category"]["fields"]["tree"]
    analyzer = template["settings"]["analysis"]["analyzer"][tree["analyzer"]]
    tokenizer = template["settings"]["analysis"]["tokenizer"][analyzer["tokenizer"]]
    assert tokenizer == {"type": "path_hierarchy", "delimiter": "/"}
    # Queries must not be split into their own prefixes, or 'A/B' would also match all of 'A'.
    assert tree["search_analyzer"] == "keyword"
    assert properties["category"]["type"] == "keyword"  # aggregatable
    # A local feature is three fields named after it: keypoints, words, and the words' vocabulary.
    assert properties["sift"]["type"] == "binary"  # stored in _source, never indexed
    assert properties["sift_words"]["analyzer"] == "whitespace"
    assert properties["sift_vocab"] == {"type": "keyword"}
    assert not {"keypoints", "words", "words_vocab"} & set(properties)
    assert properties["title"]["type"] == "text" and properties["attributes"]["type"] == "flattened"
    assert "sift" not in index_template({"deep": 8})["template"]["mappings"]["properties"]


def test_category_filter_is_one_term_on_whole_path_levels():
    assert category_filter("/Packages/Milk/") == {"term": {"category.tree": "Packages/Milk"}}
    assert category_filter("") is None and category_filter(None) is None


def test_knn_body_filters_by_category_and_asks_for_more_candidates_than_k():
    body = knn_body("deep", np.ones(4, np.float32), 5, ItemFilter(category="Fruit"))
    assert body["knn"]["field"] == "deep" and body["knn"]["k"] == 5
    assert body["knn"]["num_candidates"] >= 5 * 4
    assert body["knn"]["filter"] == {"term": {"category.tree": "Fruit"}}
    assert "sift" not in body["source"] and "deep" not in body["source"]
    assert "filter" not in knn_body("deep", np.ones(4, np.float32), 5)["knn"]


def test_words_body_is_bool_should_of_terms_on_the_feature_words_boosted_by_query_frequency():
    body = words_body("sift", np.array([3, 9, 9, 9, 4]), 7, ItemFilter(category="Dairy"))
    should = body["query"]["bool"]["should"]
    assert should[0] == {"term": {"sift_words": {"value": "w9", "boost": 3.0}}}
    assert {clause["term"]["sift_words"]["value"] for clause in should} == {"w3", "w4", "w9"}
    assert body["query"]["bool"]["filter"] == [{"term": {"category.tree": "Dairy"}}]
    assert body["source"] == ["key"]
    assert words_body("sift", np.array([], np.int64), 7) is None


def test_item_key_is_a_stable_non_negative_int64():
    assert item_key("Fruit/Apple/1.jpg") == item_key("Fruit/Apple/1.jpg")
    assert item_key("a") != item_key("b")
    assert 0 <= item_key("x" * 500) < 2**63


# --- requests through the official client


def test_knn_search_request_reaches_the_search_endpoint_and_scores_come_back_as_cosine(server):
    store = shop(server)
    server.responses.append({"hits": {"hits": [
        {"_score": 0.95, "_source": {"key": 11}}, {"_score": 0.5, "_source": {"key": 12}},
    ]}})
    scores, keys = store.knn("deep", np.ones((1, 4), np.float32), 3, ItemFilter(category="Dairy"))
    method, path, body = server.requests[0]
    assert (method, path) == ("POST", "/shop/_search")
    assert body["knn"]["filter"] == {"term": {"category.tree": "Dairy"}}
    assert body["knn"]["query_vector"] == [1.0, 1.0, 1.0, 1.0]
    assert keys.tolist() == [[11, 12, -1]]
    np.testing.assert_allclose(scores[0, :2], [0.9, 0.0], atol=1e-6)


def test_bulk_indexing_names_each_document_by_item_id_so_rewrites_replace(server):
    store = shop(server)
    server.responses += [bulk_ok, bulk_ok]
    first = store.write([update("a"), update("b", seed=1)])
    again = store.write([update("a")])
    lines = bulk_lines(server)
    actions = [line for line in lines if "index" in line]
    assert [action["index"]["_id"] for action in actions] == ["a", "b", "a"]
    assert all(action["index"]["_index"] == "shop" for action in actions)
    source = lines[1]
    assert source["id"] == "a" and source["key"] == item_key("a") and len(source["deep"]) == 4
    # Keypoints go in whole; their words are pending until the run quantises them.
    assert base64.b64decode(source["sift"]) == KEYPOINTS
    assert source["sift_vocab"] == "pending" and "sift_words" not in source
    assert first[0] == again[0] == item_key("a")


def test_bulk_chunk_is_retried_with_exponential_backoff_after_a_connection_error(server):
    sleeps: list[float] = []
    store = shop(server, initial_backoff=1.0, sleep=sleeps.append)
    server.responses += [ConnectionError("node restarting"), ConnectionError("node restarting"), bulk_ok]
    store.write([update("a")])
    assert sleeps == [1.0, 2.0]
    assert len(server.requests) == 3
    assert server.requests[0][2] == server.requests[2][2]  # the same idempotent chunk again


def test_bulk_gives_up_after_max_retries(server):
    store = shop(server, max_retries=2, sleep=lambda _: None)
    server.responses += [ConnectionError("down")] * 3
    with pytest.raises(ConnectionError):
        store.write([update("a")])
    assert len(server.requests) == 3


def test_deleting_an_absent_item_is_not_an_error_but_a_rejected_document_is(server):
    store = shop(server)
    server.responses.append({"errors": True, "items": [{"delete": {"_id": "gone", "status": 404, "result": "not_found"}}]})
    assert store.delete(["gone", "gone"]) == [item_key("gone")]
    server.responses.append({"errors": True, "items": [{"index": {"_id": "a", "status": 400, "error": {"type": "mapper_parsing_exception"}}}]})
    with pytest.raises(RuntimeError, match="rejected 1 document"):
        store.write([update("a")])


def test_ensure_index_puts_the_template_then_creates_the_index(server):
    store = shop(server)
    store.ensure_index({"deep": 8}, ["sift"])
    paths = [(method, path) for method, path, _ in server.requests]
    assert paths == [("HEAD", "/shop"), ("PUT", "/_index_template/shop"), ("PUT", "/shop")]
    properties = server.requests[1][2]["template"]["mappings"]["properties"]
    assert properties["deep"]["dims"] == 8 and properties["sift_words"]["type"] == "text"


def test_ensure_index_maps_only_the_missing_fields_of_a_live_index_and_keeps_vector_dims(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4})
    server.requests.clear()
    store.ensure_index({"deep": 4, "colour": 192}, ["sift"], ["ae_score"])
    [(method, path, body)] = [request for request in server.requests if request[0] == "PUT"]
    assert (method, path) == ("PUT", "/shop/_mapping")
    assert set(body["properties"]) == {"colour", "sift", "sift_words", "sift_vocab", "ae_score"}
    assert body["properties"]["ae_score"] == {"type": "float"} and cluster.properties["colour"]["dims"] == 192
    server.requests.clear()
    store.ensure_index({"deep": 4, "colour": 192}, ["sift"], ["ae_score"])  # all there: nothing to map
    with pytest.raises(ValueError, match="keeps its dims"):
        store.ensure_index({"deep": 8})
    assert not [request for request in server.requests if request[0] == "PUT"]


def test_keypoints_are_fetched_for_the_requested_candidates_only(server):
    store = shop(server)
    blob = base64.b64encode(b"kp").decode()
    server.responses.append({"hits": {"hits": [{"_source": {"key": 3, "sift": blob}}]}})
    assert store.rows("sift", [3, 4]) == {3: b"kp"}
    [(_, path, body)] = server.requests
    assert path == "/shop/_search" and body["query"] == {"terms": {"key": [3, 4]}}
    assert body["_source"] == ["key", "sift"] and body["size"] == 2


def test_categories_come_from_a_terms_aggregation(server):
    store = shop(server)
    assert store.categories() == {}  # no index yet: no categories, no search
    server.existing.add("shop")
    server.responses.append({"hits": {"hits": []}, "aggregations": {"categories": {"buckets": [{"key": "Dairy/Milk", "doc_count": 4}]}}})
    assert store.categories() == {"Dairy/Milk": 4}
    assert server.requests[-1][2]["aggs"]["categories"]["terms"]["field"] == "category"


def test_a_category_filter_of_the_elasticsearch_store_is_its_path_and_keys_narrow_it(server):
    store = shop(server)
    category = store.category_filter("/Dairy/")
    # The cluster indexes the path: no key list is resolved for a category, however large.
    assert category == ItemFilter(category="Dairy") and category.keys is None and not server.requests
    server.responses += [{"hits": {"hits": []}}] * 2
    store.knn("deep", np.ones(4, np.float32), 2, category)
    store.knn("deep", np.ones(4, np.float32), 2, category.narrowed(np.array([3, 5])))
    assert server.requests[0][2]["knn"]["filter"] == {"term": {"category.tree": "Dairy"}}
    assert server.requests[1][2]["knn"]["filter"] == {
        "bool": {"filter": [{"term": {"category.tree": "Dairy"}}, {"terms": {"key": [3, 5]}}]}}
    server.requests.clear()
    scores, keys = store.knn("deep", np.ones(4, np.float32), 2, category.narrowed(np.array([], np.int64)))
    assert not server.requests and keys.tolist() == [[-1, -1]] and np.isneginf(scores).all()


def test_elasticsearch_stores_satisfy_the_store_protocols(server, tmp_path):
    _, catalog = cluster_catalog(server, tmp_path)
    catalog.write([update("a")])
    assert isinstance(catalog.items, ItemStore)
    assert isinstance(catalog.vectors("deep"), VectorStore) and catalog.vectors("deep").dim == 4
    assert isinstance(catalog.words("sift"), WordIndex)
    with pytest.raises(IndexUnavailableError, match="no 'colour' vectors"):
        catalog.vectors("colour")


def test_word_scores_from_elasticsearch_are_relative_to_the_best_hit(server):
    store = shop(server)
    server.responses.append({"hits": {"hits": [{"_score": 8.0, "_source": {"key": 1}}, {"_score": 2.0, "_source": {"key": 2}}]}})
    keys, scores = store.word_candidates("sift", np.array([1, 2]), 5, ItemFilter(keys=np.array([1, 2, 3])))
    assert keys.tolist() == [1, 2] and scores.tolist() == [1.0, 0.25]
    assert server.requests[0][2]["query"]["bool"]["filter"] == [{"terms": {"key": [1, 2, 3]}}]


def test_recommended_factory_grows_from_exact_through_hnsw_to_reranked_ivfpq_with_catalog_size():
    import faiss

    from catalens.indexer.stores.faiss_vectors import (
        recommended_factory,
        recommended_search_parameters,
    )

    assert recommended_factory(20_000, 1280) == "Flat"
    assert recommended_factory(100_000, 1280) == "HNSW32"
    assert recommended_search_parameters("HNSW32") == "efSearch=128"
    assert recommended_factory(1_000_000, 1280) == "IVF4096_HNSW32,PQ64,Refine(SQ8)"
    large = recommended_factory(20_000_000, 1280)
    assert large.startswith("IVF16384") and "PQ" in large
    index = faiss.index_factory(64, large.replace("PQ64", "PQ16"), faiss.METRIC_INNER_PRODUCT)
    faiss.ParameterSpace().set_index_parameters(index, recommended_search_parameters(large))
    assert faiss.extract_index_ivf(index).nprobe == 16 and faiss.downcast_index(index).k_factor == 30


# --- locations: open_catalog and the command line reach the cluster


def test_elasticsearch_locations_name_the_cluster_and_one_index(monkeypatch):
    assert parse_location("es+http://es.example:9200/shop") == ("http://es.example:9200", "shop")
    assert parse_location("es+https://user:pw@es.example/shop/") == ("https://user:pw@es.example", "shop")
    monkeypatch.setenv("CATALENS_ES_INDEX", "products")
    assert parse_location("es+http://localhost:9200") == ("http://localhost:9200", "products")
    assert elastic_location("http://localhost:9200/") == "es+http://localhost:9200/products"
    assert parse_location(elastic_location("http://localhost:9200", "shop")) == ("http://localhost:9200", "shop")
    with pytest.raises(ValueError, match="one index"):
        parse_location("es+http://localhost:9200/shop/extra")
    with pytest.raises(ValueError, match="not an Elasticsearch location"):
        parse_location("http://localhost:9200/shop")


def test_open_catalog_reaches_the_cluster_and_refuses_an_absent_index(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CATALENS_ES_STATE", str(tmp_path / "state"))
    cluster = MiniCluster(server)
    with pytest.raises(IndexUnavailableError, match="no such Elasticsearch index"):
        open_catalog("es+http://localhost:9200/shop")
    assert ("HEAD", "/shop", None) in server.requests  # it asked the cluster
    catalog = open_catalog("es+http://localhost:9200/shop", IndexConfig(features=["deep"]), create=True)
    try:
        assert isinstance(catalog, ElasticCatalog) and catalog.location == "es+http://localhost:9200/shop"
        assert catalog.items.index == "shop" and catalog.items.state_dir == tmp_path / "state"
        catalog.write([update("a")])
        catalog.save()
    finally:
        catalog.close()
    assert set(cluster.docs) == {"a"}
    catalog = open_catalog("es+http://localhost:9200/shop")
    try:
        assert catalog.items.count() == 1 and catalog.config.features == ["deep"] and catalog.dims() == {"deep": 4}
    finally:
        catalog.close()
    with pytest.raises(IndexUnavailableError, match="no catalens index here"):
        open_catalog(tmp_path / "absent")  # a folder location stays the folder backend


def test_an_existing_elasticsearch_index_keeps_the_configuration_it_was_built_with(server, tmp_path, monkeypatch):
    """Indexing again (``catalens index`` creates if absent) must not drop features fitted since."""
    monkeypatch.setenv("CATALENS_ES_STATE", str(tmp_path / "state"))
    MiniCluster(server)
    built = IndexConfig(features=["deep", "ae"], feature_options={"sift": {"vocab_size": 64}})
    catalog = open_catalog("es+http://localhost:9200/shop", built, create=True)
    catalog.save()
    catalog.close()
    again = open_catalog("es+http://localhost:9200/shop", IndexConfig(), create=True)
    assert again.config.features == ["deep", "ae"] and again.config.feature_options == {"sift": {"vocab_size": 64}}
    again.close()
    with pytest.raises(IndexUnavailableError, match="backbone"):
        open_catalog("es+http://localhost:9200/shop", IndexConfig(backbone="efficientnet_lite2"), create=True)


def test_backend_es_on_the_command_line_reaches_the_cluster(server, tmp_path, monkeypatch, capsys):
    from catalens.api.cli import main

    monkeypatch.delenv("CATALENS_ES_URL", raising=False)
    monkeypatch.setenv("CATALENS_ES_INDEX", "shop")
    monkeypatch.setenv("CATALENS_ES_STATE", str(tmp_path / "state"))
    backend = ["--backend", "es", "--es-url", "http://localhost:9200"]
    assert main(["info", *backend]) == 2
    assert "no such Elasticsearch index" in capsys.readouterr().err
    cluster, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"]))
    catalog.write([update("a"), update("b", "Fruit/Apple", seed=1)])
    catalog.save()
    assert main(["info", *backend, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"] == "es+http://localhost:9200/shop" and info["backend"] == "elasticsearch"
    assert info["items"] == len(cluster.docs) == 2 and info["categories"] == 2 and info["dims"] == {"deep": 4}
    assert info["state"] == str(tmp_path / "state") and info["modes"] == ["fused", "deep"]
    # The environment alone picks the cluster; --backend es without a URL is refused.
    monkeypatch.setenv("CATALENS_ES_URL", "http://localhost:9200")
    assert main(["remove", "a"]) == 0 and set(cluster.docs) == {"b"}
    monkeypatch.delenv("CATALENS_ES_URL")
    assert main(["info", "--backend", "es"]) == 2
    assert "--es-url" in capsys.readouterr().err


# --- an in-memory cluster: whole runs and searches through the official client


class MiniCluster:
    """Just enough of one Elasticsearch index, in memory, for catalens' requests.

    It evaluates the query shapes catalens sends (term, terms, exists, bool, kNN, scroll,
    bulk index/update/delete, put-mapping, update-by-query), so a whole indexing run and searches
    in every mode can go through the official client; each request stays in ``server.requests``
    to be checked. Documents are held to the index's strict mapping as a server holds them, and
    a partial update that sets a field to null leaves it null (``exists`` no longer matches).
    As on a server, searches, counts and update-by-query see the documents as of the last
    refresh; a document fetched by id is always the latest.
    """

    def __init__(self, server: FakeServer, index: str = "shop"):
        self.server, self.index = server, index
        self.docs: dict[str, dict] = {}  # the latest documents
        self.searchable: dict[str, dict] = {}  # the documents as of the last refresh
        self.properties: dict[str, dict] = {}
        server.route = self.answer

    def refresh(self) -> None:
        self.searchable = copy.deepcopy(self.docs)

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
            if self.properties.get(field, {}).get("analyzer") == "whitespace":  # visual words
                return value in (source.get(field) or "").split()
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
        """Term queries on words, scored as Lucene's BM25 scores them (k1 1.2, b 0.75), times each boost."""
        total = 0.0
        for clause in query.get("bool", {}).get("should", []):
            field, term = next(iter(clause["term"].items()))
            documents = [(doc.get(field) or "").split() for doc in self.searchable.values()]
            tokens = (source.get(field) or "").split()
            frequency = tokens.count(term["value"])
            if frequency:
                holding = sum(term["value"] in words for words in documents)
                idf = np.log(1 + (len(documents) - holding + 0.5) / (holding + 0.5))
                norm = 1.2 * (0.25 + 0.75 * len(tokens) / np.mean([len(words) for words in documents]))
                total += term["boost"] * float(idf) * frequency * 2.2 / (frequency + norm)
        return total or 1.0

    def search(self, body: dict, params: dict) -> dict:
        fields = body.get("_source", True)

        def hit(item_id, score):
            source = self.searchable[item_id]
            kept = source if fields is True else {f: source[f] for f in fields if f in source}
            return {"_id": item_id, "_score": score, "_source": kept}

        if "knn" in body:
            knn = body["knn"]
            assert knn["num_candidates"] >= knn["k"] and self.properties[knn["field"]]["type"] == "dense_vector"
            query = np.asarray(knn["query_vector"], np.float32)
            scored = []
            for item_id, source in self.searchable.items():
                if source.get(knn["field"]) is not None and ("filter" not in knn or self.matches(source, knn["filter"])):
                    vector = np.asarray(source[knn["field"]], np.float32)
                    cosine = float(vector @ query / (np.linalg.norm(vector) * np.linalg.norm(query)))
                    scored.append(((1 + cosine) / 2, item_id))
            scored.sort(reverse=True)
            return {"hits": {"hits": [hit(i, sc) for sc, i in scored[: knn["k"]]]}}
        query = body.get("query", {"match_all": {}})
        found = [(self.score(source, query), item_id) for item_id, source in self.searchable.items() if self.matches(source, query)]
        found.sort(key=lambda pair: -pair[0])
        size = len(found) if "scroll" in params or "scroll" in body else body.get("size", 10)
        answer = {"hits": {"hits": [hit(i, sc) for sc, i in found[:size]]}}
        if "scroll" in params or "scroll" in body:
            answer.update({"_scroll_id": "all", "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}})
        if "aggs" in body:
            counts: dict[str, int] = {}
            for source in self.searchable.values():
                counts[source["category"]] = counts.get(source["category"], 0) + 1
            answer["aggregations"] = {"categories": {"buckets": [{"key": c, "doc_count": n} for c, n in counts.items()]}}
        return answer

    def rejection(self, fields: dict) -> dict | None:
        """The error a strict mapping gives for these document fields, or None."""
        for name, value in fields.items():
            spec = self.properties.get(name)
            if spec is None:
                return {"type": "strict_dynamic_mapping_exception", "reason": f"[{name}] is not mapped"}
            if value is None:
                continue
            if spec["type"] == "dense_vector" and len(value) != spec["dims"]:
                return {"type": "document_parsing_exception", "reason": f"[{name}] has {len(value)} dims, not {spec['dims']}"}
            if spec["type"] == "float" and not isinstance(value, int | float):
                return {"type": "document_parsing_exception", "reason": f"[{name}] is not a number"}
            if spec["type"] == "binary":
                base64.b64decode(value, validate=True)
        return None

    def bulk(self, body) -> dict:
        lines = [json.loads(line) for line in body]
        items, position = [], 0
        while position < len(lines):
            op, meta = next(iter(lines[position].items()))
            assert meta["_index"] == self.index, meta
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
        """Runs the one script catalens sends: remove fields from the matching documents."""
        script = body["script"]
        assert script["source"] == REMOVE_FIELDS and script.get("lang", "painless") == "painless"
        assert body.get("conflicts", params.get("conflicts")) == "proceed"
        query = body.get("query", {"match_all": {}})
        matching = [item_id for item_id, source in self.searchable.items() if self.matches(source, query)]
        updated = [item_id for item_id in matching if self.docs.get(item_id) == self.searchable[item_id]]
        for item_id in updated:
            for field in script["params"]["fields"]:
                self.docs[item_id].pop(field, None)
        if params.get("refresh") in (True, "true"):
            self.refresh()
        # A document changed since the last refresh is a version conflict: skipped, as asked.
        return {"total": len(matching), "updated": len(updated), "version_conflicts": len(matching) - len(updated),
                "failures": []}

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
            return {"count": len(self.searchable)}
        if parts == [self.index, "_refresh"]:
            self.refresh()
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


def on_cluster(server: FakeServer) -> tuple[MiniCluster, ElasticItemStore]:
    """An in-memory cluster and the item store of its index ("shop"), retrying without sleeping."""
    return MiniCluster(server), shop(server, sleep=lambda _: None)


def cluster_catalog(server: FakeServer, tmp_path, config: IndexConfig | None = None) -> tuple[MiniCluster, ElasticCatalog]:
    """An in-memory cluster and a catalog of its index, its state folder in ``tmp_path/state``."""
    cluster, store = on_cluster(server)
    config = config or IndexConfig(features=["deep", "sift"], num_workers=0)
    return cluster, ElasticCatalog(store, config, state_dir=tmp_path / "state")


class QuadrantColours:
    """A stand-in deep feature (no network): mean colour of 4 quadrants, L2-normalised."""

    name, dim, draft_size = "deep", 12, 0

    @staticmethod
    def preparer(image):
        array = np.asarray(image.convert("RGB").resize((64, 64)), np.float32)
        return np.concatenate([q.mean(axis=(0, 1)) for r in np.split(array, 2) for q in np.split(r, 2, axis=1)])

    def finish(self, prepared):
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        rows = np.stack(prepared).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def stand_in(monkeypatch, name: str, build) -> None:
    """Every catalog the test opens builds feature ``name`` with ``build(catalog)``."""
    from catalens.indexer import features

    spec = features.feature_spec(name)
    monkeypatch.setitem(features._REGISTRY, name, dataclasses.replace(spec, build=build))


@pytest.fixture()
def stand_in_deep(monkeypatch):
    stand_in(monkeypatch, "deep", lambda catalog: QuadrantColours())


@pytest.fixture()
def es_catalog(tmp_path):
    items = []
    for number in range(8):
        category = ["Packages/Milk", "Packages/Juice", "Fruit/Apple", "Fruit/Pear"][number % 4]
        path = tmp_path / "catalog" / f"{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_label(number).save(path, quality=95)
        items.append(CatalogItem(f"item{number}", path, category, f"item {number}", {}))
    return items


def _local_config() -> IndexConfig:
    # Words as discriminative as a real catalog's (whose vocabularies have 1k-64k words).
    return IndexConfig(features=["deep", "sift"], feature_options={"sift": {"vocab_size": 512}}, num_workers=0,
                       commit_every=3)


def _indexed(server, tmp_path, items) -> tuple[MiniCluster, ElasticCatalog]:
    """``items`` indexed into the in-memory cluster with the stand-in deep feature and RootSIFT."""
    cluster, catalog = cluster_catalog(server, tmp_path, _local_config())
    report = index_catalog(items, catalog, progress=False)
    assert report.added == len(items) and not report.failures
    return cluster, catalog


def _searches(server):
    return [body for method, path, body in server.requests if path.endswith("/_search") and body]


def _crop(image):
    width, height = image.size
    return image.crop((width // 5, height // 5, 4 * width // 5, 4 * height // 5)).resize((300, 300))


def _calibrated(engine: SearchEngine) -> SearchEngine:
    """``engine`` with its match calibration and the catalog classifier its confidences read fitted
    (as the command that wrote the catalog does at its end) before the searches a test inspects."""
    from catalens.search.refit import refit_catalog

    refit_catalog(engine.catalog)
    return engine


def test_a_global_feature_mode_is_answered_by_knn_on_the_cluster_with_cosine_scores(server, tmp_path, monkeypatch):
    from PIL import Image

    class Fixed:
        name, dim, draft_size = "deep", 4, 0
        preparer = staticmethod(lambda image: None)

        def finish(self, prepared):
            return np.tile(np.array([1.0, 0.0, 0.0, 0.0], np.float32), (len(prepared), 1))

    stand_in(monkeypatch, "deep", lambda catalog: Fixed())
    _, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"]))
    rows = {"a": [0.6, 0.8, 0, 0], "b": [1, 0, 0, 0], "c": [1, 0, 0, 0]}
    catalog.write([ItemUpdate(CatalogItem(item_id, f"/{item_id}.jpg", category, item_id.upper(), {}), "1:1",
                              {"deep": np.array(rows[item_id], np.float32)})
                   for item_id, category in (("a", "Dairy/Milk"), ("b", "Dairy/Yoghurt"), ("c", "Fruit/Apple"))])
    catalog.save()  # searchable now
    engine = _calibrated(SearchEngine(catalog))
    server.requests.clear()
    server.params.clear()  # in step with requests
    [result] = engine.search([Image.new("RGB", (32, 32))], k=3, mode="deep", category="Dairy")
    assert [(hit.id, round(hit.score, 3), hit.title) for hit in result.results] == [("b", 1.0, "B"), ("a", 0.6, "A")]
    [knn] = [body["knn"] for body in _searches(server) if "knn" in body]
    # The kNN query filters on the category path, not on a list of keys that grows with the category.
    assert knn["filter"] == {"term": {"category.tree": "Dairy"}}
    assert not [params for params in server.params if "scroll" in params]  # no scan of the catalog


def test_local_features_are_indexed_into_elasticsearch_with_words_of_a_vocabulary_fitted_on_them(server, es_catalog, tmp_path, stand_in_deep):
    from catalens.indexer.features.sift import VOCABULARY

    cluster, catalog = _indexed(server, tmp_path, es_catalog)
    vocabulary = VOCABULARY.current(catalog).model
    assert vocabulary.size == 512 and vocabulary.fitted_on_ == len(es_catalog)
    assert (catalog.state_dir / "models").is_dir() and catalog.models_dir == catalog.state_dir / "models"
    for source in cluster.docs.values():
        assert source["sift_vocab"] == vocabulary.id_
        assert len(source["sift_words"].split()) > 50  # one word per keypoint
        assert len(base64.b64decode(source["sift"])) > 50 * 128  # the keypoints stay beside their words
    assert cluster.properties["sift_vocab"] == {"type": "keyword"} and cluster.properties["sift"] == {"type": "binary"}
    assert not catalog.words("sift").stale(vocabulary.id_)

    # resume: nothing extracted, nothing re-quantised; a new item alone gets its words
    server.requests.clear()
    again = index_catalog(es_catalog, catalog, progress=False)
    assert again.extracted == 0 and again.unchanged == len(es_catalog)
    assert not bulk_lines(server)
    extra_item = CatalogItem("item9", es_catalog[1].image, "Fruit/Pear", "copy", {})
    server.requests.clear()
    grown = index_catalog([*es_catalog, extra_item], catalog, progress=False)
    assert grown.added == grown.extracted == 1
    lines = bulk_lines(server)
    assert [line["index"]["_id"] for line in lines if "index" in line] == ["item9"]
    assert [line["update"]["_id"] for line in lines if "update" in line] == ["item9"]
    assert cluster.docs["item9"]["sift_words"] == cluster.docs["item1"]["sift_words"]
    assert VOCABULARY.current(catalog).model.id_ == vocabulary.id_  # not refitted for one item more


@pytest.mark.parametrize("mode", ["local", "fused"])
def test_local_and_fused_modes_run_against_elasticsearch_with_term_queries_and_few_keypoint_fetches(server, es_catalog, tmp_path, stand_in_deep, mode):
    cluster, catalog = _indexed(server, tmp_path, es_catalog)
    settings = SearchSettings(local_verify_top=3, verify_top=2, candidates=4, word_candidates=4)
    engine = _calibrated(SearchEngine(catalog, settings))
    server.requests.clear()
    server.params.clear()
    [result] = engine.search([_crop(textured_label(5))], k=3, mode=mode)
    assert result.results[0].id == "item5"
    if mode == "local":
        assert result.results[0].score >= settings.min_inliers  # geometrically verified

    searches = _searches(server)
    [words] = [body for body in searches if "should" in body.get("query", {}).get("bool", {})]
    clauses = words["query"]["bool"]["should"]
    assert all(set(c["term"]["sift_words"]) == {"value", "boost"} and c["term"]["sift_words"]["value"].startswith("w")
               for c in clauses)
    assert words["_source"] == ["key"]
    fetches = [body for body in searches if body.get("_source") == ["key", "sift"]]
    fetched = [key for body in fetches for key in body["query"]["terms"]["key"]]
    # Keypoints of the verified candidates only, each once, never a scan of the catalog.
    verified = settings.local_verify_top if mode == "local" else 2 * settings.verify_top
    assert fetched and len(fetched) == len(set(fetched)) <= verified < len(cluster.docs)
    assert not [params for params in server.params if "scroll" in params]
    knn = [body for body in searches if "knn" in body]
    assert bool(knn) == (mode == "fused")


@pytest.mark.parametrize("mode", ["deep", "local", "fused"])
def test_category_filter_reaches_the_elasticsearch_queries_of_every_mode(server, es_catalog, tmp_path, stand_in_deep, mode):
    _, catalog = _indexed(server, tmp_path, es_catalog)
    engine = _calibrated(SearchEngine(catalog))
    server.requests.clear()
    [result] = engine.search([_crop(textured_label(5))], k=4, mode=mode, category="Packages")
    assert result.results and all(hit.category.startswith("Packages/") for hit in result.results)
    filters = [body["knn"]["filter"] if "knn" in body else body["query"]["bool"]["filter"]
               for body in _searches(server) if "knn" in body or "should" in body.get("query", {}).get("bool", {})]
    assert filters and all(f in ({"term": {"category.tree": "Packages"}}, [{"term": {"category.tree": "Packages"}}]) for f in filters)


def test_local_mode_on_elasticsearch_without_a_vocabulary_says_so(server, tmp_path, stand_in_deep):
    from PIL import Image

    from catalens.indexer.features import FeatureUnavailableError

    _, catalog = cluster_catalog(server, tmp_path, _local_config())
    with pytest.raises(FeatureUnavailableError, match="no visual vocabulary yet"):
        SearchEngine(catalog).search([Image.new("RGB", (64, 64))], k=3, mode="local")


def test_classify_runs_against_elasticsearch_on_the_rows_stored_there(server, es_catalog, tmp_path, stand_in_deep):
    """Classification fits on the cluster's stored vectors: the same code as on the folder backend."""
    from PIL import Image

    from catalens.search.classify import CLASSIFIER, classify

    _, catalog = _indexed(server, tmp_path, es_catalog)
    CLASSIFIER.refit(catalog)  # as `catalens index` does at its end: classify itself never fits
    keys, rows = vectors_of(catalog.items, "deep", 12)
    assert len(keys) == len(es_catalog) and rows.shape == (len(es_catalog), 12) and list(keys) == sorted(keys)
    [result] = classify(catalog, [Image.open(es_catalog[2].image)])
    assert result.error is None and result.category == es_catalog[2].category
    assert result.neighbours[0] == es_catalog[2].id


def test_failures_are_kept_in_the_state_folder_until_the_item_is_written(server, es_catalog, tmp_path, stand_in_deep):
    _, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"], num_workers=0))
    broken = CatalogItem("broken", tmp_path / "broken.jpg", "Fruit/Pear", "broken", {})
    broken.image.write_bytes(b"not a jpeg")
    report = index_catalog([*es_catalog[:2], broken], catalog, progress=False)
    assert report.added == 2 and [failure.item_id for failure in report.failures] == ["broken"]
    assert [failure.item_id for failure in catalog.items.failures()] == ["broken"]
    assert "broken.jpg" in (catalog.state_dir / "failures.json").read_text()
    textured_label(9).save(broken.image, format="JPEG")
    assert index_catalog([*es_catalog[:2], broken], catalog, progress=False).added == 1
    assert catalog.items.failures() == [] and catalog.info()["failures"] == 0


# --- feature rows of stored items: partial updates of their documents


def test_feature_rows_are_sent_as_partial_updates_named_by_item_id(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4, "ae": 3}, ["sift"], ["ae_score"])
    store.write([update("a"), update("b", seed=1)])
    store.refresh()
    a, b = item_key("a"), item_key("b")
    code = np.array([0.6, 0.0, 0.8], np.float32)
    server.requests.clear()
    store.put_rows("ae", {a: code.tobytes()})
    store.put_rows("ae_score", {a: np.float32(2.5).tobytes(), b: np.float32(0.0).tobytes()})
    assert bulk_lines(server) == [
        {"update": {"_index": "shop", "_id": "a"}}, {"doc": {"ae": code.tolist()}},
        {"update": {"_index": "shop", "_id": "a"}}, {"doc": {"ae_score": 2.5}},
        {"update": {"_index": "shop", "_id": "b"}}, {"doc": {"ae_score": 0.0}},
    ]
    assert cluster.docs["a"]["deep"] and cluster.docs["a"]["sift_vocab"] == "pending"  # the rest of the document stays
    store.refresh()
    # Read back as the folder backend keeps them: float32 bytes by key, a zero score included.
    assert store.rows("ae") == {a: code.tobytes()}
    assert store.rows("ae_score", [a, b]) == {a: np.float32(2.5).tobytes(), b: np.float32(0.0).tobytes()}
    assert store.row_keys("ae_score") == {a, b} and store.rows("sift", [b]) == {b: KEYPOINTS}
    assert store.row_keys("sift") == {a, b} and store.row_keys("deep_ft") == set()


def test_unmapped_rows_are_refused_and_rows_of_deleted_items_are_dropped(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4}, ["sift"])
    store.write([update("a")])
    store.refresh()
    with pytest.raises(ValueError, match="not mapped"):
        store.put_rows("deep_ft", {item_key("a"): np.ones(4, np.float32).tobytes()})
    # A vector of the wrong size is refused by the cluster's mapping, as a real one refuses it.
    with pytest.raises(RuntimeError, match="rejected 1 document"):
        store.put_rows("deep", {item_key("a"): np.ones(3, np.float32).tobytes()})
    assert len(cluster.docs["a"]["deep"]) == 4
    # Rows of an item deleted meanwhile are dropped, not sent to fail.
    server.requests.clear()
    store.put_rows("deep", {item_key("gone"): np.ones(4, np.float32).tobytes()})
    assert not bulk_lines(server)


def test_a_server_takes_in_a_finetune_another_process_recorded_in_the_shared_state_folder(server, tmp_path, monkeypatch):
    """Every machine points at one state folder: a server running across a CLI ``finetune`` takes in
    the feature it added and its record (the match calibration digests it), and a save of its own
    afterwards does not write its older configuration back."""
    monkeypatch.setenv("CATALENS_ES_STATE", str(tmp_path / "state"))
    MiniCluster(server)
    cli = open_catalog("es+http://localhost:9200/shop", IndexConfig(features=["deep", "colour"]), create=True)
    cli.items.ensure_index({"deep": 4}, ())
    cli.save()
    running = open_catalog("es+http://localhost:9200/shop")
    try:
        assert not running.catch_up()
        cli.config.features = [*cli.config.features, "deep_ft"]  # as the finetune's end does
        cli.meta["adaptation"] = {"steps": 200, "kept": True}
        cli.save()
        assert running.catch_up()
        assert running.config.features == ["deep", "colour", "deep_ft"]
        assert running.meta["adaptation"] == {"steps": 200, "kept": True}
        running.save()  # a write of its own (POST /items)
        assert not running.catch_up()
        # A change this process made itself stands against a file that did not make it.
        running.config.features = ["deep", "colour"]
        cli.meta["note"] = "touched"
        cli.save()
        assert running.catch_up() and running.config.features == ["deep", "colour"]
    finally:
        running.close()
        cli.close()
    reader = open_catalog("es+http://localhost:9200/shop")
    try:
        assert reader.meta["adaptation"] == {"steps": 200, "kept": True}
    finally:
        reader.close()


def test_a_field_mapped_by_another_process_takes_rows_without_a_restart(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4}, ["sift"])
    store.write([update("a")])
    store.refresh()
    assert store.row_keys("ae_score") == set()
    # `catalens train-ae` in another process maps the score beside a running server.
    other = shop(server, sleep=lambda _: None)
    other.ensure_index({}, (), ["ae_score"])
    store.put_rows("ae_score", {item_key("a"): np.float32(1.5).tobytes()})
    store.refresh()
    assert cluster.docs["a"]["ae_score"] == 1.5 and store.row_keys("ae_score") == {item_key("a")}


def test_deleting_rows_sets_their_fields_to_null_and_the_items_no_longer_hold_them(server, tmp_path):
    cluster, catalog = cluster_catalog(server, tmp_path)
    catalog.write([update("a"), update("b", seed=1)])
    catalog.save()
    a, b = item_key("a"), item_key("b")
    catalog.words("sift").put({a: np.array([1, 2]), b: np.array([3])}, "v1")
    server.requests.clear()
    catalog.vectors("deep").remove(np.array([a]))
    catalog.items.delete_rows("sift", [b])
    assert bulk_lines(server) == [
        {"update": {"_index": "shop", "_id": "a"}}, {"doc": {"deep": None}},
        {"update": {"_index": "shop", "_id": "b"}}, {"doc": {"sift": None, "sift_words": None, "sift_vocab": None}},
    ]
    assert cluster.docs["a"]["deep"] is None and cluster.docs["a"]["sift_words"] == "w1 w2"
    catalog.save()
    assert catalog.items.row_keys("deep") == {b} and catalog.vectors("deep").ntotal == 1
    assert catalog.items.row_keys("sift") == {a} and catalog.items.rows("sift") == {a: KEYPOINTS}
    assert catalog.words("sift").stale("v1") == []  # b holds no keypoints: no words to bring in line
    server.requests.clear()
    catalog.items.delete_rows("sift", [item_key("gone")])
    assert not bulk_lines(server)


def test_deleting_a_feature_removes_its_fields_from_every_document_with_one_update_by_query(server):
    cluster, store = on_cluster(server)
    store.ensure_index({"deep": 4}, ["sift"], ["ae_score"])
    store.write([update("a"), update("b", seed=1)])
    store.refresh()
    store.put_rows("ae_score", {item_key("a"): np.float32(1.0).tobytes()})
    server.requests.clear()
    store.delete_feature("ae_score")  # a row written a moment ago (not yet searchable) goes too
    [(method, path, body)] = [request for request in server.requests if request[1] != "/shop/_refresh"]
    assert (method, path) == ("POST", "/shop/_update_by_query")
    assert body["query"] == {"exists": {"field": "ae_score"}}
    assert body["script"]["params"] == {"fields": ["ae_score"]}
    assert not store.row_keys("ae_score") and all("deep" in source for source in cluster.docs.values())
    store.delete_feature("ae_score")  # again: nothing matches, nothing fails
    store.delete_feature("deep_ft")  # never mapped: nothing to send
    assert [path for _, path, _ in server.requests].count("/shop/_update_by_query") == 2
    # A local feature's words and vocabulary go with its keypoints.
    store.delete_feature("sift")
    assert server.requests[-1][2]["query"] == {"exists": {"field": "sift_vocab"}}
    assert not store.row_keys("sift") and not any({"sift", "sift_vocab"} & set(doc) for doc in cluster.docs.values())


def test_the_same_catalog_gets_the_same_item_keys_on_the_folder_and_elasticsearch_backends(server, tmp_path, stand_in_deep):
    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    config = IndexConfig(features=["deep"], num_workers=0)
    cluster, es = cluster_catalog(server, tmp_path, config)
    index_catalog(items, es, progress=False)
    index_catalog(items, tmp_path / "index", config.model_copy(deep=True), progress=False)
    folder = open_catalog(tmp_path / "index")
    try:
        expected = {item.id: item_key(item.id) for item in items}
        assert {i: r.key for i, r in es.items.records().items()} == expected
        assert {i: r.key for i, r in folder.items.records().items()} == expected
        assert {source["id"]: source["key"] for source in cluster.docs.values()} == expected
        # So vectors, and the keys searches answer with, agree between the two.
        es_keys, es_rows = vectors_of(es.items, "deep", 12)
        folder_keys, folder_rows = vectors_of(folder.items, "deep", 12)
        np.testing.assert_array_equal(es_keys, folder_keys)
        np.testing.assert_allclose(es_rows, folder_rows, rtol=1e-6)
        _, es_found = es.vectors("deep").search(es_rows[:2], 3)
        _, folder_found = folder.vectors("deep").search(es_rows[:2], 3)
        np.testing.assert_array_equal(es_found[:, 0], folder_found[:, 0])
        np.testing.assert_array_equal(es_found[:, 0], es_keys[:2])
    finally:
        folder.close()


@pytest.mark.slow
def test_a_category_search_of_the_grocery_catalog_answers_the_same_items_on_elasticsearch_as_in_a_folder(grocery_index, server, tmp_path):
    """The folder index's items and rows, written to the cluster: same keys, same filtered neighbours."""
    folder = open_catalog(grocery_index)
    try:
        records = folder.items.records()
        rows = {name: folder.items.rows(name) for name in ("deep", "colour")}
        _, es = cluster_catalog(server, tmp_path, IndexConfig(features=["deep", "colour"]))
        es.write([ItemUpdate(CatalogItem(r.id, r.image, r.category, r.title, r.attributes), r.fingerprint,
                             {name: np.frombuffer(rows[name][r.key], np.float32) for name in rows})
                  for r in records.values()])
        es.save()
        assert {i: r.key for i, r in es.items.records().items()} == {i: r.key for i, r in records.items()}
        assert es.dims() == {name: folder.dims()[name] for name in rows}
        keys, vectors = vectors_of(folder.items, "deep", folder.dims()["deep"])
        for position in (0, len(keys) // 2, len(keys) - 1):
            top = folder.items.items([int(keys[position])])[int(keys[position])].category.split("/")[0]
            es_filter, folder_filter = es.items.category_filter(top), folder.items.category_filter(top)
            # The folder resolves the category to its items' keys; the cluster filters on the path.
            assert es_filter.keys is None and len(folder_filter.keys) == sum(
                r.category.split("/")[0] == top for r in records.values())
            server.requests.clear()
            es_scores, es_keys = es.vectors("deep").search(vectors[position : position + 1], 5, es_filter)
            folder_scores, folder_keys = folder.vectors("deep").search(vectors[position : position + 1], 5, folder_filter)
            assert es_keys.tolist() == folder_keys.tolist() and es_keys[0, 0] == keys[position]
            np.testing.assert_allclose(es_scores, folder_scores, atol=1e-5)
            [knn] = [body["knn"] for body in _searches(server) if "knn" in body]
            assert knn["filter"] == {"term": {"category.tree": top}}
    finally:
        folder.close()


# --- the autoencoder and anomaly scores on Elasticsearch, as on the folder backend


def _blocky_noise(path):
    """A clearly foreign image: blocky colour noise (per-pixel noise averages to grey at 64 px)."""
    from PIL import Image

    blocks = np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((256, 256), Image.NEAREST).save(path)
    return path


def _product_updates(folder) -> list[ItemUpdate]:
    """Twelve generated products and one noise image, with stand-in deep vectors (no network)."""
    from PIL import Image

    from catalens.indexer.pipeline import file_fingerprint
    from tests.conftest import draw_product

    paths = [draw_product(folder / f"item{n:02d}.jpg", seed=n, text=f"item {n}") for n in range(12)]
    paths.append(_blocky_noise(folder / "zz_noise.png"))
    feature = QuadrantColours()
    vectors = feature.finish([feature.preparer(Image.open(path)) for path in paths])
    categories = ["Dairy/Milk", "Dairy/Yoghurt", "Fruit/Apple"]
    return [
        ItemUpdate(CatalogItem(path.name, path, categories[n % 3], path.stem, {}), file_fingerprint(path), {"deep": vector})
        for n, (path, vector) in enumerate(zip(paths, vectors, strict=True))
    ]


def _tiny_ae(catalog, **overrides):
    from catalens.indexer.training.train_autoencoder import train_autoencoder

    settings = {"epochs": 4, "input_kind": "pixels", "progress": False, "width": 8, "code_channels": 4, **overrides}
    return train_autoencoder(catalog, **settings)


@pytest.fixture()
def es_and_folder(server, tmp_path, stand_in_deep):
    """The same catalog in the in-memory cluster (the cluster, its catalog) and in a folder index."""
    from catalens.indexer.stores.folder import FolderCatalog

    updates = _product_updates(tmp_path / "catalog")
    config = IndexConfig(features=["deep"], num_workers=0)
    cluster, es = cluster_catalog(server, tmp_path, config)
    es.write(updates)
    es.save()
    folder = FolderCatalog.create(tmp_path / "index", config.model_copy(deep=True))
    folder.write(updates)
    folder.save()
    yield cluster, es, folder
    folder.close()


def test_autoencoder_trained_on_elasticsearch_scores_and_audits_as_on_the_folder_backend(server, es_and_folder, tmp_path):
    from catalens.indexer.features.autoencoder import MODEL_FILE
    from catalens.search.anomaly import audit_catalog, score_anomalies

    cluster, es, folder = es_and_folder
    cluster_model, folder_model = _tiny_ae(es), _tiny_ae(folder)
    # The same catalog and seed train the same model whichever backend holds the catalog.
    assert cluster_model.loss_history_ == pytest.approx(folder_model.loss_history_, rel=1e-5)
    assert (es.models_dir / MODEL_FILE).is_file() and es.dims()["ae"] == 4 * 4 * 4
    assert es.config.features == ["deep", "ae"] and es.meta["autoencoder"]["items"] == 13
    assert all(len(doc["ae"]) == 64 and isinstance(doc["ae_score"], float) for doc in cluster.docs.values())
    assert cluster.properties["ae_score"] == {"type": "float"}

    on_cluster, in_folder = audit_catalog(es), audit_catalog(folder)
    assert [entry.id for entry in on_cluster] == [entry.id for entry in in_folder]
    np.testing.assert_allclose([e.score for e in on_cluster], [e.score for e in in_folder], rtol=1e-4)
    ranks = [entry.id for entry in on_cluster]
    assert ranks.index("zz_noise.png") < len(ranks) // 2  # the foreign image ranks high on both

    queries = [str(tmp_path / "catalog" / "item03.jpg"), str(_blocky_noise(tmp_path / "query.png"))]
    cluster_scores = [r.score for r in score_anomalies(es, queries)]
    np.testing.assert_allclose(cluster_scores, [r.score for r in score_anomalies(folder, queries)], rtol=1e-4)
    assert cluster_scores[1] > cluster_scores[0]

    # --mode ae: kNN on the codes in their dense_vector field finds the item itself, as FAISS does.
    [found] = SearchEngine(es).search([queries[0]], k=3, mode="ae")
    [local] = SearchEngine(folder).search([queries[0]], k=3, mode="ae")
    assert found.results[0].id == "item03.jpg" and found.results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [hit.id for hit in found.results] == [hit.id for hit in local.results]
    knn = [body["knn"] for body in _searches(server) if "knn" in body]
    assert knn[-1]["field"] == "ae" and len(knn[-1]["query_vector"]) == 64


def test_the_audit_on_elasticsearch_scores_items_added_since_training_and_stores_their_scores(server, es_and_folder, tmp_path):
    from catalens.search.anomaly import audit_catalog

    _, es, _ = es_and_folder
    _tiny_ae(es, epochs=2)
    extra = _product_updates(tmp_path / "more")[0]
    extra.item = CatalogItem("late.jpg", extra.item.image, "Fruit/Apple", "late", {})
    es.write([extra])
    es.save()
    assert item_key("late.jpg") not in es.items.row_keys("ae_score")
    entries = audit_catalog(es)
    assert len(entries) == 14 and "late.jpg" in {entry.id for entry in entries}
    es.items.refresh()
    assert item_key("late.jpg") in es.items.row_keys("ae_score")  # scored once, kept


def test_retraining_on_elasticsearch_with_another_code_size_is_refused_before_the_codes_go(server, es_and_folder):
    _, es, _ = es_and_folder
    _tiny_ae(es, epochs=1)
    before = es.items.rows("ae"), es.items.rows("ae_score")
    with pytest.raises(ValueError, match="keeps its dims"):
        _tiny_ae(es, epochs=1, code_channels=2, fresh=True)
    assert (es.items.rows("ae"), es.items.rows("ae_score")) == before
    assert len(before[0]) == 13


def test_train_ae_and_anomaly_commands_take_the_elasticsearch_backend(server, es_and_folder, tmp_path, monkeypatch, capsys):
    from catalens.api.cli import main

    cluster, es, _ = es_and_folder
    monkeypatch.delenv("CATALENS_ES_URL", raising=False)
    monkeypatch.setenv("CATALENS_ES_INDEX", "shop")
    monkeypatch.setenv("CATALENS_ES_STATE", str(es.state_dir))
    backend = ["--backend", "es", "--es-url", "http://localhost:9200"]
    query = str(tmp_path / "catalog" / "item00.jpg")
    assert main(["anomaly", query, *backend]) == 2
    assert "train-ae" in capsys.readouterr().err
    assert main(["train-ae", *backend, "--epochs", "2", "--input", "pixels", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and str(es.state_dir / "models" / "ae_loss.png") in out
    dims = cluster.properties["ae"]["dims"]
    assert all(len(doc["ae"]) == dims and isinstance(doc["ae_score"], float) for doc in cluster.docs.values())
    assert main(["anomaly", query, *backend, "--json"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(line) == {"query", "score", "threshold", "anomalous"}
    # The environment alone picks the cluster, as for index and search.
    monkeypatch.setenv("CATALENS_ES_URL", "http://localhost:9200")
    assert main(["anomaly", "--audit", "--top", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(line["id"].endswith((".jpg", ".png")) for line in lines)
    assert main(["search", query, "--mode", "ae", "--k", "1", "--json"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["results"][0]["id"] == "item00.jpg"


def test_finetune_and_classify_take_the_elasticsearch_backend(server, es_and_folder, tmp_path, monkeypatch, capsys):
    """finetune maps deep_ft on the cluster before writing it; classify then reads it there."""
    from catalens.api.cli import main

    cluster, es, _ = es_and_folder
    monkeypatch.delenv("CATALENS_ES_URL", raising=False)
    monkeypatch.setenv("CATALENS_ES_INDEX", "shop")
    monkeypatch.setenv("CATALENS_ES_STATE", str(es.state_dir))
    backend = ["--backend", "es", "--es-url", "http://localhost:9200"]
    from catalens.indexer.training import adaptation

    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)  # kept, whatever two steps achieve: this checks the plumbing
    assert main(["finetune", *backend, "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == len(cluster.docs) == 13 and report["products"] == 3 and report["kept"]
    assert cluster.properties["deep_ft"]["dims"] == 1280
    assert all(len(doc["deep_ft"]) == 1280 for doc in cluster.docs.values())
    assert (es.state_dir / "models" / "deep_ft_adapted.pt").is_file()
    query = str(tmp_path / "catalog" / "item04.jpg")
    assert main(["classify", query, *backend, "--json"]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The query's own catalog photo is its nearest support item: queries and support share deep_ft.
    assert line["neighbours"][0] == "item04.jpg" and line["category"].split("/")[0] in {"Dairy", "Fruit", "unknown"}


# --- indexing into Elasticsearch extracts every configured feature, as into a folder


def test_indexing_into_elasticsearch_writes_the_colour_feature_and_fills_it_in_on_older_indexes(server, tmp_path, stand_in_deep):
    from catalens.indexer.catalog import write_json_atomic
    from catalens.indexer.features.colour import ColourHistogram
    from catalens.indexer.stores.elastic.catalog import META_FILE

    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    cluster, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"], num_workers=0))
    report = index_catalog(items, catalog, progress=False)
    assert report.added == len(items) and "colour" not in catalog.dims()
    # An index from before the colour feature: its stored configuration names no features.
    meta = json.loads((catalog.state_dir / META_FILE).read_text())
    meta["config"] = {"backbone": "efficientnet_lite0", "local_features": False, "num_workers": 0}
    write_json_atomic(catalog.state_dir / META_FILE, meta)
    older = ElasticCatalog(shop(server, sleep=lambda _: None), state_dir=catalog.state_dir)
    assert older.config.features == ["deep", "colour"]
    # The next run extracts every item again, as on the folder backend.
    again = index_catalog(items, older, progress=False)
    assert again.extracted == again.updated == len(items) and not again.unchanged
    assert older.dims()["colour"] == ColourHistogram.dim == 192
    assert cluster.properties["colour"]["similarity"] == "cosine"
    keys, rows = vectors_of(older.items, "colour", 192)  # what classification fits on
    assert len(keys) == len(items)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    third = index_catalog(items, older, progress=False)
    assert third.extracted == 0 and third.unchanged == len(items)


def test_items_indexed_into_elasticsearch_after_training_get_autoencoder_codes(server, tmp_path, stand_in_deep):
    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    cluster, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"], num_workers=0))
    index_catalog(items, catalog, progress=False)
    _tiny_ae(catalog, epochs=1)
    late = CatalogItem("late.jpg", items[0].image, "Fruit/Apple", "late", {})
    report = index_catalog([*items, late], catalog, progress=False)
    assert report.added == report.extracted == 1  # the others have their codes from training
    # The same image, the same code (training coded float16 copies of the inputs: nearly the same).
    assert np.dot(cluster.docs["late.jpg"]["ae"], cluster.docs[items[0].id]["ae"]) == pytest.approx(1.0, abs=1e-4)
    # Scores are the audit's: a new item has none until it is audited.
    assert cluster.docs["late.jpg"].get("ae_score") is None and cluster.docs[items[0].id]["ae_score"] is not None
    assert catalog.items.row_keys("ae_score") == {item_key(item.id) for item in items}


def test_items_indexed_into_elasticsearch_after_finetuning_get_deep_ft_rows(server, tmp_path, stand_in_deep, monkeypatch):
    from catalens.indexer.training import adaptation

    items = [update.item for update in _product_updates(tmp_path / "catalog")]
    cluster, catalog = cluster_catalog(server, tmp_path, IndexConfig(features=["deep"], num_workers=0))
    index_catalog(items, catalog, progress=False)
    monkeypatch.setattr(adaptation, "MIN_GAIN", -1.0)
    assert adaptation.adapt_catalog(catalog, steps=2, progress=False).kept
    late = CatalogItem("late.jpg", items[0].image, "Fruit/Apple", "late", {})
    report = index_catalog([*items, late], catalog, progress=False)
    assert report.added == report.extracted == 1  # the others have their rows from fine-tuning
    # The same image, the same row (fine-tuning read float16 copies of the trunk maps: nearly the same).
    assert np.dot(cluster.docs["late.jpg"]["deep_ft"], cluster.docs[items[0].id]["deep_ft"]) == pytest.approx(1.0, abs=1e-3)


# --- integration: the folder backend's scenarios against a live cluster

ES_URL = os.environ.get("CATALENS_ES_URL")
needs_es = pytest.mark.skipif(not ES_URL, reason="CATALENS_ES_URL is not set: no Elasticsearch to test against")


@pytest.fixture()
def live_catalog(tmp_path):
    """A function making a catalog of a fresh index on the live cluster; the index goes afterwards."""
    made = []

    def make(config: IndexConfig) -> ElasticCatalog:
        store = ElasticItemStore.connect(ES_URL, index=f"catalens-test-{uuid.uuid4().hex[:8]}")
        made.append(store)
        return ElasticCatalog(store, config, state_dir=tmp_path / "es-state", url=ES_URL)

    yield make
    for store in made:
        store.client.indices.delete(index=store.index, ignore_unavailable=True)
        store.client.options(ignore_status=404).indices.delete_index_template(name=store.index)
        store.close()


@pytest.mark.es
@needs_es
def test_es_index_search_filter_delete_and_resume(live_catalog, tiny_catalog):
    from catalens.datasets.catalog import load_catalog
    from catalens.indexer.features import embed
    from catalens.indexer.features.sift import VOCABULARY
    from catalens.indexer.imageio import load_rgb
    from catalens.search.engine import available_modes

    live = live_catalog(IndexConfig(commit_every=4, feature_options={"sift": {"vocab_size": 64}}))
    items = load_catalog(tiny_catalog)
    report = index_catalog(items, live, progress=False)
    assert report.added == len(items) and not report.failures
    assert live.items.count() == len(items)
    # every item with keypoints has words of the vocabulary fitted on them
    vocabulary = VOCABULARY.current(live).model
    assert live.items.row_keys("sift") and not live.words("sift").stale(vocabulary.id_)

    # search: an indexed image finds itself first; a category filter keeps to whole levels
    vector = embed(live.feature("deep"), [load_rgb(items[0].image)])
    scores, keys = live.vectors("deep").search(vector, 3)
    assert keys[0, 0] == item_key(items[0].id) and scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    top = items[0].category.split("/")[0]
    _, keys = live.vectors("deep").search(vector, 12, live.items.category_filter(top))
    records = live.items.items(keys[0][keys[0] >= 0])
    assert records and all(r.category.split("/")[0] == top for r in records.values())
    assert set(live.items.categories()) == {item.category for item in items}

    # every search mode runs against the cluster, with and without a category filter
    assert set(available_modes(live)) >= {"fused", "local", "deep", "colour", "sift"}
    for mode in available_modes(live):
        for category in (None, top):
            [result] = SearchEngine(live).search([items[0].image], k=3, mode=mode, category=category)
            assert result.results[0].id == items[0].id, (mode, category)
            assert category is None or all(hit.category.split("/")[0] == top for hit in result.results)

    # words: a bag-of-words query finds the item whose words it shares
    # (word ids past the 64-word vocabulary: no other item has them)
    live.write([ItemUpdate(items[1], "x", {"deep": vector[0], "sift": b"kp"})])
    live.words("sift").put({item_key(items[1].id): np.array([1000, 1001, 1001])}, "stale")
    live.items.refresh()
    found, _ = live.words("sift").search(np.array([1001, 1001, 9999]), 5)
    assert found[0] == item_key(items[1].id)
    assert live.items.rows("sift", [item_key(items[1].id)]) == {item_key(items[1].id): b"kp"}

    # resume: a second run extracts item 1 alone (its fingerprint is stale) and duplicates nothing
    again = index_catalog(items, live, progress=False)
    assert again.extracted == 1 and live.items.count() == len(items)
    assert not live.words("sift").stale(VOCABULARY.current(live).model.id_)  # item 1 re-quantised
    [result] = SearchEngine(live).search([items[1].image], k=3, mode="local")
    assert result.results[0].id == items[1].id

    # delete, twice: idempotent; pruning by a shorter catalog removes the rest
    live.delete([items[0].id])
    live.delete([items[0].id])
    live.items.refresh()
    assert live.items.item_by_id(items[0].id) is None and live.items.count() == len(items) - 1
    for mode in ("deep", "local", "fused"):
        [result] = SearchEngine(live).search([items[0].image], k=5, mode=mode)
        assert items[0].id not in [hit.id for hit in result.results], mode
    pruned = index_catalog(items[:5], live, progress=False)
    assert pruned.removed == len(items) - 5 and live.items.count() == 5


@pytest.mark.es
@needs_es
def test_es_autoencoder_audit_scores_and_ae_search_match_the_folder_backend(live_catalog, tiny_catalog, tmp_path):
    """The anomaly scenario on a live cluster: index (colour included), train-ae, audit, score, --mode ae."""
    from catalens.datasets.catalog import load_catalog
    from catalens.search.anomaly import audit_catalog, score_anomalies

    _blocky_noise(tiny_catalog / "Fruit/Apple/zz_noise.png")
    config = IndexConfig(features=["deep", "colour"])
    items = load_catalog(tiny_catalog)
    live = live_catalog(config)
    index_catalog(items, live, progress=False)
    assert live.dims()["colour"] == 192 and len(live.items.row_keys("colour")) == len(items)
    index_catalog(items, tmp_path / "index", config.model_copy(deep=True), progress=False)
    folder = open_catalog(tmp_path / "index")
    try:
        _tiny_ae(live), _tiny_ae(folder)
        on_cluster, in_folder = audit_catalog(live), audit_catalog(folder)
        assert [entry.id for entry in on_cluster] == [entry.id for entry in in_folder]
        np.testing.assert_allclose([e.score for e in on_cluster], [e.score for e in in_folder], rtol=1e-4)
        query = str(items[3].image)
        [cluster_result], [folder_result] = score_anomalies(live, [query]), score_anomalies(folder, [query])
        assert cluster_result.score == pytest.approx(folder_result.score, rel=1e-4)
        [found] = SearchEngine(live).search([query], k=3, mode="ae")
        assert found.results[0].id == items[3].id and found.results[0].score == pytest.approx(1.0, abs=1e-3)
    finally:
        folder.close()
