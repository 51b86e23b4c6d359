#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: install coyo_vit on every worker, then start train.py on
# all of them at once (one process per host; jax.distributed finds the slice by itself).
#
#   TPU_NAME=coyo-v4-256 ZONE=us-central2-b WORKDIR=gs://bucket/runs/l16 \
#   DATA='gs://bucket/coyo/shards/*.tfrecord' scripts/tpu_pod.sh configs/coyo_pretrain.py:variant=L/16
#
# Re-running the same command after a preemption resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
CONFIG=${1:?usage: scripts/tpu_pod.sh CONFIG [extra train.py flags]}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs:// recommended)}" "${DATA:?set DATA (shard glob)}"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
# Ship this checkout's committed code (HEAD) to every worker, then install it there.
archive=$(mktemp --suffix=.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":coyo_vit.tar.gz --zone "$ZONE" --worker=all
rm -f "$archive"
ssh_all "set -e; mkdir -p coyo_vit && tar -xzf coyo_vit.tar.gz -C coyo_vit; cd coyo_vit; \
  pip install -q -e . && pip install -q -U 'jax[tpu]'"
extra=""  # printf of no arguments would give one empty-string argument, which train.py rejects
(( $# )) && extra=$(printf ' %q' "$@")
ssh_all "cd coyo_vit && COYO_VIT_DISTRIBUTED=auto nohup python train.py --config $CONFIG \
  --workdir $WORKDIR --config.input.data.files='$DATA'$extra > train.log 2>&1 &"
echo "Started on every worker of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f coyo_vit/train.log'"
