"""Batch-level operations shared by the facade and the engine: storing, status, finishing, intake."""
