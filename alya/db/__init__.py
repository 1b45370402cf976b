"""PostgreSQL: the transport, the typed queries, the schema and its migrations."""
