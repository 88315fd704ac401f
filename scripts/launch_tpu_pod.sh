#!/usr/bin/env bash
# Run jaxengine on a Cloud TPU VM slice (one or several hosts): create the VM, install, run the same
# command on every worker.  Process 0 serves HTTP; the others run its steps (docs/sharding.md).
#
#   scripts/launch_tpu_pod.sh create              # create the TPU VM (once)
#   scripts/launch_tpu_pod.sh install             # pip install jaxengine[tpu] on every worker
#   scripts/launch_tpu_pod.sh copy /local/ckpt    # copy a checkpoint dir to every worker (same path)
#   scripts/launch_tpu_pod.sh serve /ckpt 16      # jaxengine serve on all workers, tp = 16 chips
#   scripts/launch_tpu_pod.sh run 'python my_script.py'   # any command on all workers
#   scripts/launch_tpu_pod.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v5litepod-16 = 4 hosts x 4 chips),
# RUNTIME_VERSION, PROJECT, JAXENGINE_SPEC (what pip installs; default: this checkout via git URL).
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxengine-pod}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
JAXENGINE_SPEC=${JAXENGINE_SPEC:-"jaxengine[tpu,server,orbax] @ git+$(git config --get remote.origin.url 2>/dev/null || echo https://github.com/OWNER/jaxengine)"}
PORT=${PORT:-8000}

gtpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all() { gtpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd=${1:-help}; shift || true
case "$cmd" in
  create)
    gtpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ;;
  install)
    on_all "python3 -m pip install -U pip && python3 -m pip install '$JAXENGINE_SPEC'" ;;
  copy)  # the checkpoint must be at the same path on every host (or on a shared disk / GCS fuse)
    src=${1:?checkpoint dir}; dst=${2:-$src}
    on_all "mkdir -p '$dst'"
    gtpu scp --recurse --worker=all "$src"/* "$TPU_NAME:$dst/" ;;
  serve)
    model=${1:?model dir}; tp=${2:?tensor parallel size = number of chips in the slice}
    # JAXENGINE_MULTIHOST=1: jax.distributed.initialize() finds the other hosts through the TPU
    # metadata server.  A dead host stops every process after JAXENGINE_HEARTBEAT_TIMEOUT_S.
    on_all "JAXENGINE_MULTIHOST=1 JAXENGINE_HEARTBEAT_TIMEOUT_S=\${JAXENGINE_HEARTBEAT_TIMEOUT_S:-60} \
      nohup jaxengine serve '$model' --tensor-parallel-size $tp --host 0.0.0.0 --port $PORT \
      > ~/jaxengine.log 2>&1 &"
    echo "worker 0 serves http://<worker-0 IP>:$PORT/v1; logs: ~/jaxengine.log on each worker" ;;
  run)
    on_all "JAXENGINE_MULTIHOST=1 ${1:?command}" ;;
  logs)
    on_all "tail -n ${1:-50} ~/jaxengine.log" ;;
  stop)
    on_all "pkill -f 'jaxengine serve' || true" ;;
  delete)
    gtpu delete "$TPU_NAME" --quiet ;;
  *)
    sed -n '2,14p' "$0"; exit 1 ;;
esac
