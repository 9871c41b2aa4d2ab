"""Query-time logic: candidate retrieval, fusion, verification, classification, anomaly scores."""
