"""Example apps on alya, ported from Alya's examples.

Deploy them with prefect.yaml or ``python -m flows.serve``."""
