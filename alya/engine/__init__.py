"""The processing engine: worker identity, claims, row execution, write-back, maintenance."""
