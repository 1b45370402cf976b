"""The other external systems: Redis (the status cache), the object store, files of rows."""
