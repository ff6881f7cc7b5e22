"""The archive store's revisions, oldest first (``0001_archive_store.py``)."""
