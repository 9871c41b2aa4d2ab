"""The HTTP routes, grouped by what they serve: searching by photo, the catalog's items, the server itself."""
