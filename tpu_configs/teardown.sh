#!/usr/bin/env bash
# Deletes the TPU VM (or GPU VM); the runs stay in the bucket.
#   tpu_configs/teardown.sh --target=v4-32 --name=NAME [--zone=ZONE] [--dry-run]
# A thin wrapper of `python -m sentcomp.launcher.launch teardown` (see tpu_configs/README.md); needs only python3 and gcloud.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m sentcomp.launcher.launch teardown "$@"
