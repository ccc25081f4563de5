#!/bin/bash
# The same sharding without a scheduler: host I of the N given runs shard I/N over ssh
# (sampling, then executing its samples), then the shards are merged here.
#
#   recipes/scale/hosts.sh runs/big host1 host2 host3
#   BASE_URL=http://gpu1:8000/v1 K=8 SSH="ssh -F cluster.cfg" recipes/scale/hosts.sh runs/big h1 h2
#
# Every host must see RUN_DIR and the VPD command at the paths they have here (a shared
# filesystem); the script can be started from any directory. It takes the settings of
# sample-execute-array.sbatch from the environment: BASE_URL (space-separated; default
# http://127.0.0.1:8000/v1, each host's own server), MODEL, K=5, TEMPERATURE=0.5,
# MAX_RETRIES=6, CONCURRENCY=16, QUESTIONS (default RUN_DIR/data/train.jsonl), WORKERS,
# SAMPLE_ARGS, EXECUTE_ARGS, VPD (default: this checkout's .venv/bin/vpd, else the first
# on PATH), and:
#   SSH             the ssh command (default: ssh -o BatchMode=yes, which never prompts)
#   MERGE_PARTIAL=1 merge the shards of the hosts that finished even when another failed
#
# Host I's output goes to RUN_DIR/shards/host.I.log. When every host finished, the shards
# are merged into RUN_DIR/samples.jsonl and RUN_DIR/executions.jsonl, exactly these N files:
#   vpd merge --out RUN_DIR/samples.jsonl    RUN_DIR/shards/samples.{0..N-1}.jsonl
#   vpd merge --out RUN_DIR/executions.jsonl RUN_DIR/shards/executions.{0..N-1}.jsonl
# When a host fails the script names it and exits 1, merging nothing (unless
# MERGE_PARTIAL=1); running the same command again resumes every shard.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: hosts.sh RUN_DIR HOST... (settings: see the header of this script)" >&2
  exit 2
fi
RUN=$(realpath -m -- "$1")  # absolute: the hosts do not start in this directory
shift
HOSTS=("$@")
N=${#HOSTS[@]}
if [ -z "${VPD:-}" ]; then
  # Physical: this folder is vpd/recipes/scale, reached through the checkout's recipes/ link
  # or directly; three levels up is the checkout either way (site-packages when installed).
  CHECKOUT=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
  if [ -x "$CHECKOUT/.venv/bin/vpd" ]; then
    VPD=$CHECKOUT/.venv/bin/vpd
  else
    VPD=$(command -v vpd) || { echo "hosts.sh: no vpd: set VPD" >&2; exit 2; }
  fi
fi
QUESTIONS=$(realpath -m -- "${QUESTIONS:-$RUN/data/train.jsonl}")
if [ ! -f "$QUESTIONS" ]; then
  echo "hosts.sh: no questions file $QUESTIONS (set QUESTIONS)" >&2
  exit 2
fi
SHARDS=$RUN/shards
mkdir -p "$SHARDS"
# As in the sbatch script: the shard count is recorded once, and a run started with
# another number of hosts stops before it writes anything.
echo "$N" > "$SHARDS/N.$$"
ln "$SHARDS/N.$$" "$SHARDS/N" 2> /dev/null || true
rm -f "$SHARDS/N.$$"
read -r HAD < "$SHARDS/N"
if [ "$HAD" != "$N" ]; then
  echo "hosts.sh: $SHARDS holds $HAD shards, $N hosts were given: give $HAD hosts" \
    "(a host may repeat) or start over in another run directory" >&2
  exit 2
fi

LLM=()
for URL in ${BASE_URL:-http://127.0.0.1:8000/v1}; do LLM+=(--base-url "$URL"); done
if [ -n "${MODEL:-}" ]; then LLM+=(--model "$MODEL"); fi
read -r -a SAMPLE_MORE <<< "${SAMPLE_ARGS:-}"
read -r -a EXECUTE_MORE <<< "${EXECUTE_ARGS:-}"
if [ -n "${WORKERS:-}" ]; then EXECUTE_MORE+=(--workers "$WORKERS"); fi
read -r -a SSH_CMD <<< "${SSH:-ssh -o BatchMode=yes}"

shard_command() {  # the shell command host $1 runs (quoted for the remote shell)
  local i=$1
  printf '%q ' "$VPD" sample "$QUESTIONS" --out "$SHARDS/samples.$i.jsonl" --shard "$i/$N" \
    --backend openai "${LLM[@]}" --k "${K:-5}" --temperature "${TEMPERATURE:-0.5}" \
    --max-retries "${MAX_RETRIES:-6}" --concurrency "${CONCURRENCY:-16}" "${SAMPLE_MORE[@]}"
  printf '&& '
  printf '%q ' "$VPD" execute "$SHARDS/samples.$i.jsonl" --questions "$QUESTIONS" \
    --out "$SHARDS/executions.$i.jsonl" --shard "$i/$N" "${EXECUTE_MORE[@]}"
}

PIDS=()
for I in "${!HOSTS[@]}"; do
  "${SSH_CMD[@]}" "${HOSTS[$I]}" "$(shard_command "$I")" \
    < /dev/null > "$SHARDS/host.$I.log" 2>&1 &
  PIDS+=($!)
done
# Each host's own exit status (a bare `wait` returns 0 whatever the hosts did).
FAILED=()
DONE=()
for I in "${!HOSTS[@]}"; do
  if wait "${PIDS[$I]}"; then
    DONE+=("$I")
    echo "shard $I/$N on ${HOSTS[$I]}: done"
  else
    echo "shard $I/$N on ${HOSTS[$I]}: FAILED (exit $?); the end of $SHARDS/host.$I.log:" >&2
    tail -n 5 "$SHARDS/host.$I.log" | sed 's/^/    /' >&2
    FAILED+=("${HOSTS[$I]}")
  fi
done
if [ ${#FAILED[@]} -gt 0 ] && [ "${MERGE_PARTIAL:-0}" != 1 ]; then
  echo "hosts.sh: failed on ${FAILED[*]}; nothing merged. Run the same command again to" \
    "resume (finished shards are skipped), or set MERGE_PARTIAL=1 to merge the others." >&2
  exit 1
fi

SAMPLES=()
EXECUTIONS=()
for I in "${DONE[@]}"; do
  SAMPLES+=("$SHARDS/samples.$I.jsonl")
  EXECUTIONS+=("$SHARDS/executions.$I.jsonl")
done
if [ ${#DONE[@]} -gt 0 ]; then
  "$VPD" merge --out "$RUN/samples.jsonl" "${SAMPLES[@]}"
  "$VPD" merge --out "$RUN/executions.jsonl" "${EXECUTIONS[@]}"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "hosts.sh: failed on ${FAILED[*]}; merged the ${#DONE[@]} other shards" >&2
  exit 1
fi
