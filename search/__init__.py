"""Query-time logic: candidate retrieval, fusion, verification, classification, anomaly scores."""

import catalens.indexer  # noqa: E402, F401 - its BLAS thread setting must come before numpy loads
