"""faiss on the GPU: exact and IVF search agree with the CPU. Runs only with CUDA + faiss-gpu."""

from __future__ import annotations

import numpy as np
import pytest

from catalens.indexer.stores import ItemFilter
from catalens.indexer.stores.faiss_vectors import FaissVectorStore, gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CUDA and a faiss build with GPU support"),
]


def _data(n: int = 20_000, dim: int = 128, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF256,Flat"])
def test_gpu_search_agrees_with_cpu(factory):
    rows, queries = _data(), _data(200, seed=1)
    keys = np.arange(len(rows), dtype=np.int64) * 7 + 3  # catalog keys, not positions
    results = {}
    for use_gpu in (False, True):
        store = FaissVectorStore(rows.shape[1], factory, use_gpu=use_gpu)
        store.train(rows)
        store.add(keys, rows)
        results[use_gpu] = store.search(queries, 10)
        assert store.use_gpu is use_gpu  # the GPU copy was made, not silently skipped
    (cpu_scores, cpu_keys), (gpu_scores, gpu_keys) = results[False], results[True]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_keys, gpu_keys, strict=True)])
    assert overlap >= 0.99
    np.testing.assert_allclose(gpu_scores[:, 0], cpu_scores[:, 0], atol=1e-4)
    assert set(np.unique(gpu_keys)) <= set(keys)


def test_filtered_search_on_a_gpu_store_stays_within_the_allowed_keys():
    rows = _data(2_000)
    store = FaissVectorStore(rows.shape[1], "Flat", use_gpu=True)
    store.add(np.arange(len(rows), dtype=np.int64), rows)
    allowed = np.arange(0, 2_000, 5, dtype=np.int64)
    _, keys = store.search(rows[:3], 10, ItemFilter(allowed))
    assert set(keys.ravel()) <= set(allowed)


def test_gpu_copy_searches_with_the_configured_nprobe():
    rows, queries = _data(), _data(100, seed=2)
    exact = FaissVectorStore(rows.shape[1], "Flat", use_gpu=False)
    exact.add(np.arange(len(rows), dtype=np.int64), rows)
    _, truth = exact.search(queries, 10)
    store = FaissVectorStore(rows.shape[1], "IVF256,Flat", use_gpu=True, search_params="nprobe=1")
    store.train(rows)
    store.add(np.arange(len(rows), dtype=np.int64), rows)
    recalls = []
    for params in ("nprobe=1", "nprobe=64"):
        store.set_search_parameters(params)  # drops the GPU copy; the next search makes it with these
        _, found = store.search(queries, 10)
        assert store.use_gpu
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    assert recalls[1] > recalls[0] + 0.2
