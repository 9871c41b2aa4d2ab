"""Feature extraction and the stores an index keeps (FAISS, SQLite, Elasticsearch)."""
