#!/usr/bin/env bash
# Shows the end of every host's log of a run.
#   tpu_configs/logs.sh --target=v4-32 --name=NAME --run=RUN [--lines=50] [--dry-run]
# A thin wrapper of `python -m sentcomp.launcher.launch logs` (see tpu_configs/README.md); needs only python3 and gcloud.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m sentcomp.launcher.launch logs "$@"
