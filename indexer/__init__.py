"""Building an index: features by registry (``features/``), the stores behind one contract
(``stores/``: folder and Elasticsearch backends), what is fitted on a catalog (``training/``),
and the one pipeline that ties them together (``pipeline``). ``backends.open_catalog`` opens one.
"""
