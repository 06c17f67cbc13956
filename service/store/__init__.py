"""Storage: everything that knows which database it is on.

``database.Database`` is the boundary the rest of the service speaks to: it is
chosen once, from the URL, and carries the backend's machinery. ``sqlite/``
holds SQLite's (connection rules, the writer thread, the rows process, the
checkpointer); ``postgres/`` holds PostgreSQL's (NOTIFY and the LISTEN
listener). Nothing here is imported by this file: the SQLite rows process
starts from ``sqlite/rows_child.py`` and must import next to nothing.
"""
