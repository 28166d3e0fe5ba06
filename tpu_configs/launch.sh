#!/usr/bin/env bash
# Starts python -m sentcomp.main on every host, workdir gs://BUCKET/runs/RUN (mounted at ~/gcs/runs/RUN).
#   tpu_configs/launch.sh --target=v4-32 --name=NAME --run=RUN --config=experiments/X.py[:args] [--dry-run] [-- --sweep --config.key=value]
# A thin wrapper of `python -m sentcomp.launcher.launch launch` (see tpu_configs/README.md); needs only python3 and gcloud.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m sentcomp.launcher.launch launch "$@"
