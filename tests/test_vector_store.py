"""FAISS vector store: configured search parameters take effect, filtered search on every kind."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from catalens.indexer.config import IndexConfig
from catalens.indexer.stores import ItemFilter
from catalens.indexer.stores.faiss_vectors import FaissVectorStore, recommended_search_parameters


def clustered(n: int, dim: int = 32, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """Points around a few centres: IVF cells then mean something, as with image embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(rows)
    return rows


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small indexes train in many short parallel regions; on shared cores those spin for
    # minutes with two threads and take a second with one.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rows, queries = clustered(8_000), clustered(100, seed=1)
    keys = np.arange(len(rows), dtype=np.int64) * 5 + 11  # catalog keys, not positions
    _, truth = faiss.knn(queries, rows, 10, metric=faiss.METRIC_INNER_PRODUCT)
    return rows, queries, keys, keys[truth]


def built(factory: str, rows: np.ndarray, keys: np.ndarray, search_params: str = "auto") -> FaissVectorStore:
    store = FaissVectorStore(rows.shape[1], factory, use_gpu=False, search_params=search_params)
    store.train(rows)
    store.add(keys, rows)
    return store


def test_recommended_nprobe_finds_what_a_single_probed_cell_misses(data):
    rows, queries, keys, truth = data
    store = built("IVF128,Flat", rows, keys, search_params="nprobe=1")
    assert faiss.extract_index_ivf(store._index).nprobe == 1
    single = recall_at_10(store.search(queries, 10)[1], truth)
    store.set_search_parameters("auto")
    assert store.search_params == recommended_search_parameters("IVF128,Flat") == "nprobe=16"
    recommended = recall_at_10(store.search(queries, 10)[1], truth)
    assert single < 0.8 and recommended > 0.95 and recommended - single > 0.2


def test_reranking_factor_from_the_parameters_restores_pq_recall(data):
    rows, queries, keys, truth = data
    store = built("IVF64,PQ8x4,Refine(Flat)", rows, keys, search_params="nprobe=16,k_factor_rf=1")
    codes_only = recall_at_10(store.search(queries, 10)[1], truth)
    store.set_search_parameters("nprobe=16,k_factor_rf=10")
    assert recall_at_10(store.search(queries, 10)[1], truth) > codes_only + 0.2


def test_search_parameters_survive_save_and_load_from_configuration(data, tmp_path):
    rows, _, keys, _ = data
    built("IVF128,Flat", rows, keys).save(tmp_path / "deep.faiss")
    loaded = FaissVectorStore.load(tmp_path / "deep.faiss", "IVF128,Flat", use_gpu=False, search_params="nprobe=7")
    assert faiss.extract_index_ivf(loaded._index).nprobe == 7
    loaded = FaissVectorStore.load(tmp_path / "deep.faiss", "IVF128,Flat", use_gpu=False)
    assert faiss.extract_index_ivf(loaded._index).nprobe == 16


def test_an_exact_fallback_saved_under_an_ivf_factory_loads_without_ivf_parameters(data, tmp_path):
    rows, _, keys, _ = data
    built("Flat", rows[:100], keys[:100]).save(tmp_path / "deep.faiss")
    loaded = FaissVectorStore.load(tmp_path / "deep.faiss", "IVF1024,PQ8", use_gpu=False, search_params="nprobe=32")
    assert loaded.factory == "Flat" and loaded.search_params == ""


def test_parameters_that_do_not_apply_fail_with_one_sentence():
    with pytest.raises(ValueError, match="do not apply to a 'Flat' index"):
        FaissVectorStore(8, "Flat", use_gpu=False, search_params="nprobe=4")


def test_catalog_index_applies_the_configured_parameters(tmp_path):
    from catalens.indexer.stores.folder import FolderCatalog

    index = FolderCatalog.create(tmp_path / "idx", IndexConfig(faiss_factory="IVF64,Flat", faiss_search_params="nprobe=5"))
    try:
        store = index._new_vector_store(32, expected_rows=10_000)
        assert faiss.extract_index_ivf(store._index).nprobe == 5
        assert index._new_vector_store(32, expected_rows=10).factory == "Flat"  # too few rows to train
    finally:
        index.close()
    assert IndexConfig.from_json({"faiss_factory": "HNSW32"}).faiss_search_params == "auto"


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat", "IVF64,PQ8x4,Refine(SQ8)", "IVF64_HNSW32,PQ8x4,Refine(SQ8)"])
def test_filtered_search_keeps_to_allowed_keys_on_every_index_kind(data, factory):
    rows, _, keys, _ = data
    store = built(factory, rows, keys)
    allowed = keys[::7]
    queries = rows[::7][:40]
    _, found = store.search(queries, 5, ItemFilter(allowed))
    assert set(found.ravel()) <= set(allowed.tolist()) | {-1}
    # Each query is an allowed item: it finds itself, so the filter carried nprobe/k_factor.
    assert np.mean(found[:, 0] == allowed[:40]) >= 0.95


def test_filtered_ivf_search_uses_the_index_nprobe_not_the_faiss_default(data):
    rows, queries, keys, _ = data
    allowed = keys[::2]
    _, truth = faiss.knn(queries, rows[::2], 10, metric=faiss.METRIC_INNER_PRODUCT)
    truth = allowed[truth]
    store = built("IVF128,Flat", rows, keys, search_params="nprobe=1")
    single = recall_at_10(store.search(queries, 10, ItemFilter(allowed))[1], truth)
    store.set_search_parameters("nprobe=32")
    assert recall_at_10(store.search(queries, 10, ItemFilter(allowed))[1], truth) > single + 0.2
