#!/usr/bin/env bash
# Installs Python 3.11, gcsfuse (bucket at ~/gcs), sentcomp and JAX on every host.
#   tpu_configs/setup.sh --target=v4-32 --name=NAME --bucket=BUCKET [--repo=URL] [--ref=main] [--dry-run]
# A thin wrapper of `python -m sentcomp.launcher.launch setup` (see tpu_configs/README.md); needs only python3 and gcloud.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m sentcomp.launcher.launch setup "$@"
