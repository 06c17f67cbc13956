"""SQLite's wing of the store (see service/store/__init__.py)."""
