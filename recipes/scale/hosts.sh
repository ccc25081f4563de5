#!/bin/bash
# The same sharding without a scheduler: one shard per host over ssh (each host sees the
# run directory on a shared filesystem and has its own OpenAI-compatible server).
#
#   recipes/scale/hosts.sh runs/big host1 host2 host3
#
# Re-running the script after a failure resumes every shard; then merge as in the
# Slurm variant.
set -euo pipefail
RUN=${1:?usage: hosts.sh RUN_DIR HOST...}
shift
N=$#
I=0
for HOST in "$@"; do
  ssh "$HOST" "cd $(pwd) && .venv/bin/vpd sample $RUN/data/train.jsonl \
      --out $RUN/shards/samples.$I.jsonl --backend openai \
      --base-url http://127.0.0.1:8000/v1 --k 5 --temperature 0.5 --shard $I/$N && \
    .venv/bin/vpd execute $RUN/shards/samples.$I.jsonl --questions $RUN/data/train.jsonl \
      --out $RUN/shards/executions.$I.jsonl --shard $I/$N" &
  I=$((I + 1))
done
wait
.venv/bin/vpd merge --out "$RUN/samples.jsonl" "$RUN"/shards/samples.*.jsonl
.venv/bin/vpd merge --out "$RUN/executions.jsonl" "$RUN"/shards/executions.*.jsonl
