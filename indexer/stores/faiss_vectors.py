"""The folder backend's ``VectorStore``: FAISS, float32 rows in, int64 item keys out.

The index type is a factory string (``IndexConfig.faiss_factory``) and how it is searched a
``faiss.ParameterSpace`` string (``IndexConfig.faiss_search_params``, ``auto`` for
``recommended_search_parameters``), so a deployment changes scale without code changes.
``recommended_factory`` is the rule measured by ``benchmarks/bench_scale.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from catalens.indexer.files import atomic_path
from catalens.indexer.stores import ItemFilter

log = logging.getLogger(__name__)

_gpu_logged = False


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# faiss GPU indexes exist for flat and IVF types only, and return at most this many neighbours.
_GPU_KINDS = (faiss.IndexFlat, faiss.IndexIVF)
_GPU_MAX_K = 2048


# Fewer query rows than this are searched on one OpenMP thread (``one_openmp_thread``).
FEW_QUERIES = 16


@contextmanager
def one_openmp_thread() -> Iterator[None]:
    """faiss work of this thread on one OpenMP thread, for the duration.

    A search's few rows are parallelised inside faiss over the database, and searches already
    run side by side (server threads, query threads): on 2 busy cores the OpenMP threads spun
    against each other and a 20k-item kNN took 57 ms instead of 9 ms on one thread
    (``benchmarks/bench_speed.py --grow``). OpenMP's thread count is per calling thread, so
    other threads (an indexing run's k-means) keep theirs.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def recommended_factory(n_items: int, dim: int = 1280) -> str:
    """The faiss factory string for a catalog of ``n_items`` ``dim``-d vectors on one machine.

    Exact search up to 30k items (no training; a query's kNN in a few milliseconds). Then HNSW32
    up to 300k: at 100k, exact search of one query took ~25 ms on one core against 0.4 ms for
    HNSW32 at recall@10 0.999, and a whole fused search took 106 against 82 ms p50
    (``benchmarks/bench_grown.py``). Beyond, IVF-PQ with ~4*sqrt(n) cells, an HNSW quantizer and
    an 8-bit re-ranking stage, which at 1M reached more recall than HNSW32 with a quarter of the
    memory (the measurements: README, "Which FAISS index for which size";
    ``benchmarks/bench_scale.py``). PQ codes without re-ranking lose most of the recall, so the
    re-ranking stage is part of the rule. Search it with ``recommended_search_parameters``.
    """
    if n_items <= 30_000:
        return "Flat"
    if n_items <= 300_000:
        return "HNSW32"
    nlist = 2 ** max(10, min(16, round(math.log2(4 * math.sqrt(n_items)))))
    subquantizers = max(m for m in (8, 16, 32, 64) if dim % m == 0) if dim % 8 == 0 else 8
    return f"IVF{nlist}_HNSW32,PQ{subquantizers},Refine(SQ8)"


def recommended_search_parameters(factory: str) -> str:
    """``faiss.ParameterSpace`` string to search ``factory`` with (faiss's defaults are nprobe=1, k_factor=1).

    nprobe=1 visits one cell of thousands and misses most neighbours; with PQ, the re-ranking
    shortlist rather than the cells limits recall, so it is widened to 30x
    (``benchmarks/bench_scale.py`` prints the sweep).
    """
    params = []
    if "IVF" in factory:
        params.append("nprobe=16")
    if "HNSW" in factory and "IVF" not in factory:
        params.append("efSearch=128")
    if "Refine" in factory or "RFlat" in factory:
        params.append("k_factor_rf=30")
    return ",".join(params)


def _is_exact(index: faiss.Index) -> bool:
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(faiss.downcast_index(inner), faiss.IndexFlat)


def filtered_parameters(index: faiss.Index, selector: faiss.IDSelector, keep: list) -> faiss.SearchParameters:
    """Per-query parameters restricting ``index`` to ``selector``, carrying the index's own settings.

    faiss takes per-query parameters of the index's own type (an IVF index refuses plain
    ``SearchParameters``), and their defaults (nprobe=1, k_factor=1) replace what was set on
    the index; so they are built from the index here. An id map translates the selector of the
    top level only, so a re-ranking index's inner search gets a translated one. ``keep``
    collects the objects faiss points to, which must outlive the search.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.IDSelectorTranslated(index.id_map, selector)
        keep.append(inner)
        params = filtered_parameters(index.index, inner, keep)
        params.sel = selector
        return params
    if isinstance(index, faiss.IndexRefine):
        base = filtered_parameters(index.base_index, selector, keep)
        keep.append(base)
        return faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=base, sel=selector)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe, max_codes=index.max_codes)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def _log_device_once(message: str, *args) -> None:
    global _gpu_logged
    if not _gpu_logged:
        log.info(message, *args)
        _gpu_logged = True


class FaissVectorStore:
    """Inner-product search over L2-normalised vectors (so scores are cosine similarities).

    ``factory`` is any faiss ``index_factory`` string: ``Flat`` (exact, the default),
    ``IVF1024,PQ32``, ``HNSW32``... Indexes that need training are trained on the first rows
    added once there are enough of them; until then an exact index answers.
    ``search_params`` is a ``faiss.ParameterSpace`` string, ``auto`` for the recommended one.
    """

    def __init__(self, dim: int, factory: str = "Flat", use_gpu: bool | str = "auto", search_params: str = "auto"):
        self.dim, self.factory = dim, factory
        self.use_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self._index = self._new_index(factory)
        self._gpu_index = None
        self.set_search_parameters(search_params)

    def _new_index(self, factory: str) -> faiss.Index:
        base = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        # IVF indexes carry ids themselves; the others need an id map to use catalog keys.
        if isinstance(base, faiss.IndexIVF):
            return base
        return faiss.IndexIDMap2(base)

    def set_search_parameters(self, params: str = "auto") -> None:
        """Apply ``params`` (``nprobe=16,efSearch=64,k_factor_rf=10``...; ``auto``: recommended)."""
        resolved = recommended_search_parameters(self.factory) if params == "auto" else params.strip()
        try:
            faiss.ParameterSpace().set_index_parameters(self._index, resolved)
        except RuntimeError as error:
            raise ValueError(
                f"faiss search parameters {resolved!r} do not apply to a {self.factory!r} index "
                f"({str(error).splitlines()[0].rsplit(':', 1)[-1].strip()})"
            ) from None
        self.search_params = resolved
        self._gpu_index = None

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self._index.is_trained:
            self._index.train(vectors)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows under ``keys``; an index that still needs training must be ``train``-ed first."""
        if len(keys) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self._index.is_trained:
            raise RuntimeError(f"faiss index {self.factory!r} must be trained before adding vectors")
        self._index.add_with_ids(vectors, np.asarray(keys, dtype=np.int64))
        self._gpu_index = None

    def remove(self, keys: np.ndarray) -> int:
        if len(keys) == 0:
            return 0
        selector = faiss.IDSelectorBatch(np.asarray(keys, dtype=np.int64))
        removed = int(self._index.remove_ids(selector))
        self._gpu_index = None
        return removed

    def keys(self) -> np.ndarray:
        index = self._index
        if isinstance(index, faiss.IndexIDMap2) or isinstance(index, faiss.IndexIDMap):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(index).invlists
        keys = [
            faiss.rev_swig_ptr(invlists.get_ids(list_no), invlists.list_size(list_no)).copy()
            for list_no in range(invlists.nlist)
        ]
        return np.concatenate(keys).astype(np.int64) if keys else np.zeros(0, np.int64)

    def _searchable(self) -> faiss.Index:
        if not self.use_gpu:
            _log_device_once("faiss: searching on the CPU (%s)", "no faiss GPU support or no CUDA device" if not gpu_available() else "GPU off")
            return self._index
        inner = self._index.index if isinstance(self._index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else self._index
        if not isinstance(faiss.downcast_index(inner), _GPU_KINDS):
            # index_cpu_to_gpu would return a second CPU copy of e.g. HNSW: twice the memory, no gain.
            _log_device_once("faiss: %s has no GPU version; searching on the CPU", self.factory)
            self.use_gpu = False
            return self._index
        if self._gpu_index is None:
            try:
                self._gpu_resources = getattr(self, "_gpu_resources", None) or faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
                if self.search_params:
                    faiss.GpuParameterSpace().set_index_parameters(self._gpu_index, self.search_params)
                _log_device_once("faiss: searching on the GPU")
            except Exception as error:  # noqa: BLE001 - e.g. HNSW has no GPU version
                log.info("faiss: %s stays on the CPU (%s)", self.factory, error)
                self.use_gpu = False
                return self._index
        return self._gpu_index

    def search(
        self, queries: np.ndarray, k: int, filter: ItemFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys), each (n_queries, k), best first; missing slots have key -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if len(queries) < FEW_QUERIES:
            with one_openmp_thread():
                return self._search(queries, k, filter)
        return self._search(queries, k, filter)

    def _search(self, queries: np.ndarray, k: int, filter: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, max(self.ntotal, 1)))
        allowed_keys = None
        if filter is not None:
            if filter.keys is None:
                raise ValueError("FAISS filters on item keys: resolve the category to keys first")
            allowed_keys = filter.keys
        if self.ntotal == 0 or (allowed_keys is not None and len(allowed_keys) == 0):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if allowed_keys is not None:
            # Filtered search runs on the CPU index: GPU indexes take no id selector.
            keep = [faiss.IDSelectorBatch(np.asarray(allowed_keys, np.int64))]
            params = filtered_parameters(self._index, keep[0], keep)
            scores, keys = self._index.search(queries, k, params=params)
        elif k > _GPU_MAX_K:
            scores, keys = self._index.search(queries, k)
        else:
            scores, keys = self._searchable().search(queries, k)
        return scores, keys

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash leaves the previous file intact."""
        with atomic_path(Path(path)) as tmp:
            faiss.write_index(self._index, str(tmp))

    @classmethod
    def load(
        cls, path: str | Path, factory: str, use_gpu: bool | str = "auto", search_params: str = "auto"
    ) -> FaissVectorStore:
        index = faiss.read_index(str(path))
        store = cls.__new__(cls)
        if factory != "Flat" and _is_exact(index):
            # Saved while the catalog was too small to train ``factory``: the exact fallback.
            factory, search_params = "Flat", "auto"
        store.dim, store.factory = index.d, factory
        store.use_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        store._index, store._gpu_index = index, None
        store.set_search_parameters(search_params)
        return store
