"""The Elasticsearch backend, for catalogs that outgrow one machine.

``mapping`` is what catalens sends (index template, documents, query bodies), ``items`` the
``ItemStore`` over one index through the official client, ``catalog`` the ``Catalog`` that
search and indexing use.
"""
