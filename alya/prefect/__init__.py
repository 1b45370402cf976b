"""Everything that talks to Prefect: batch-type flows, dispatch, the intake flows."""
