"""Everything that talks to Prefect: batch-type flows, dispatch, the intake flows, alya's lines in the runs' logs.

Importing this package installs the run log (``alya.prefect.logging``): from then on alya's log lines also
reach the logs of the Prefect flow or task run they belong to."""

from alya.prefect.logging import install

install()
