"""The HTTP API (FastAPI) and the web page: ``create_app`` in ``app``."""
