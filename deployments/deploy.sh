#!/usr/bin/env bash
# Deploy alya's example batch types and the sweeper (prefect.yaml) to a work pool.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api ALYA_DATABASE_URL=postgresql://... bash deployments/deploy.sh
#
# Creates the work pool (default "alya-pool", type process) unless it exists, then runs
# `prefect deploy --all` from the repository top (the flow runs' working directory, for a process pool).
# Extra arguments go to `prefect deploy`, e.g. another definitions file:
#   ALYA_POOL=alya-docker ALYA_POOL_TYPE=docker bash deployments/deploy.sh --prefect-file deployments/prefect.docker.yaml
#   ALYA_POOL=alya-k8s ALYA_POOL_TYPE=kubernetes ALYA_POOL_TEMPLATE=deployments/kubernetes-job-template.json \
#       bash deployments/deploy.sh --prefect-file deployments/prefect.kubernetes.yaml
# Then start a worker where ALYA_* are set:
#   PREFECT_WORKER_QUERY_SECONDS=1 prefect worker start --pool alya-pool --limit 4
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-$(command -v prefect || echo .venv/bin/prefect)}"
POOL="${ALYA_POOL:-alya-pool}"            # the name used in the definitions file
POOL_TYPE="${ALYA_POOL_TYPE:-process}"    # process | docker | kubernetes (their workers need prefect-docker / prefect-kubernetes)
POOL_TEMPLATE="${ALYA_POOL_TEMPLATE:-}"   # a base job template (JSON) for a new pool, e.g. deployments/kubernetes-job-template.json

if [ -z "${ALYA_DATABASE_URL:-}" ]; then
  echo "deploy.sh: set ALYA_DATABASE_URL (prefect deploy imports flows/*.py, which build a JobManager)" >&2
  exit 2
fi
if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$PREFECT" work-pool create "$POOL" --type "$POOL_TYPE" ${POOL_TEMPLATE:+--base-job-template "$POOL_TEMPLATE"}
fi
"$PREFECT" --no-prompt deploy --all "$@"
if ! "$PREFECT" deployment inspect alya-intake/intake >/dev/null 2>&1; then
  :  # another definitions file, without the intake
elif [ -z "${ALYA_INTAKE_URL:-}" ] || [ -z "${ALYA_INTAKE_PATTERNS:-}" ]; then
  # nothing to scan: a run every minute would only fail; deploy it unscheduled and say so
  "$PREFECT" --no-prompt deployment schedule clear alya-intake/intake -y >/dev/null
  echo "deploy.sh: alya-intake/intake deployed without a schedule: set ALYA_INTAKE_URL and ALYA_INTAKE_PATTERNS (here and for the worker) and deploy again to scan a folder" >&2
elif [ -n "${ALYA_INTAKE_EVERY_SEC:-}" ] && [ "$ALYA_INTAKE_EVERY_SEC" != 60 ]; then
  # prefect.yaml holds the default (60 s): prefect validates schedules before it fills in variables
  "$PREFECT" --no-prompt deployment schedule clear alya-intake/intake -y >/dev/null
  "$PREFECT" --no-prompt deployment schedule create alya-intake/intake --interval "$ALYA_INTAKE_EVERY_SEC" >/dev/null
fi
echo "deployed; start a worker with the same ALYA_* settings: prefect worker start --pool $POOL"
