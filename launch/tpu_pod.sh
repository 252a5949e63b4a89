#!/bin/bash
# Run pretraining on every worker of a TPU-VM pod slice (one process per host).
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a bash launch/tpu_pod.sh
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=experiments/configs/m6_10b.py bash launch/tpu_pod.sh
# Assumes the repository is cloned at ~/m6jax on every worker and installed with
# `pip install -e ".[tpu]"` (e.g. once with the same ssh --worker=all). jax detects the
# pod's coordinator and process index (pretrain.py --distributed). The workdir is local
# to each host: process 0 writes metrics and summary.json on worker 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"

# BEGIN ARGS (tests parse this block)
: "${CONFIG:=experiments/configs/m6_10b.py}"
: "${WORKDIR:=runs/m6_tpu}"
ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --distributed)
# END ARGS

printf -v QUOTED ' %q' "${ARGS[@]}" "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/m6jax && python experiments/pretrain.py$QUOTED"
