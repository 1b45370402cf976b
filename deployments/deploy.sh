#!/usr/bin/env bash
# Deploy alya's example batch types and the sweeper (prefect.yaml) to a process work pool.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api ALYA_DATABASE_URL=postgresql://... bash deployments/deploy.sh
#
# Creates the work pool "alya-pool" (type process) unless it exists, then runs `prefect deploy --all` from
# the repository top (the flow runs' working directory). Then start a worker where ALYA_* are set:
#   PREFECT_WORKER_QUERY_SECONDS=1 prefect worker start --pool alya-pool --limit 4
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-$(command -v prefect || echo .venv/bin/prefect)}"
POOL=alya-pool  # the name used in prefect.yaml

if [ -z "${ALYA_DATABASE_URL:-}" ]; then
  echo "deploy.sh: set ALYA_DATABASE_URL (prefect deploy imports flows/*.py, which build a JobManager)" >&2
  exit 2
fi
if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$PREFECT" work-pool create "$POOL" --type process
fi
"$PREFECT" --no-prompt deploy --all
if [ -n "${ALYA_INTAKE_EVERY_SEC:-}" ] && [ "$ALYA_INTAKE_EVERY_SEC" != 60 ]; then
  # prefect.yaml holds the default (60 s): prefect validates schedules before it fills in variables
  "$PREFECT" deployment clear-schedule --assume-yes alya-intake/alya >/dev/null
  "$PREFECT" deployment schedule create alya-intake/alya --interval "$ALYA_INTAKE_EVERY_SEC" >/dev/null
fi
echo "deployed; start a worker: prefect worker start --pool $POOL"
