"""The facade: JobManager, the client API of the contract."""
