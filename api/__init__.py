"""The HTTP API, the command line and the web page: they translate, the logic lives elsewhere."""
