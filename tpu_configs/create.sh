#!/usr/bin/env bash
# Creates the Cloud TPU VM (or GPU VM).
#   tpu_configs/create.sh --target=v4-32 --name=NAME [--zone=ZONE] [--project=P] [--spot] [--dry-run]
# A thin wrapper of `python -m sentcomp.launcher.launch create` (see tpu_configs/README.md); needs only python3 and gcloud.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m sentcomp.launcher.launch create "$@"
