#!/usr/bin/env bash
# The Slurm test: a one-node Slurm cluster on this machine (Debian's slurm-wlm and munge: munged,
# slurmctld and slurmd on localhost, proctrack/linuxproc, no cgroups, its own ports, key and
# socket), a 4-task array of scripts/slurm/ferry-array.sbatch over 300 OpenAI batch requests, one
# task cancelled mid-run (scancel) and resubmitted, then `ferry merge`: the merged file must equal,
# byte for byte, a single-process greedy run of the same input (0 records lost, 0 duplicated).
#
#   tests/slurm/slurm_array_test.sh FERRY_BINARY MODEL_DIR [REQUESTS]
# REQUESTS (a multiple of 4, default 300) is smaller under the sanitizers, which slow ferry 10-20x.
# Needs root (slurmd runs jobs as their users) and the packages scripts/install-deps installs.
set -euo pipefail
FERRY=$(readlink -f "$1")
MODEL=$(readlink -f "$2")
REQUESTS=${3:-300}
[ $((REQUESTS % 4)) = 0 ] && [ "$REQUESTS" -ge 40 ] || { echo "slurm test: REQUESTS must be a multiple of 4, at least 40"; exit 1; }
PER_SHARD=$((REQUESTS / 4))
SRC=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "slurm test: needs root to run slurmd"; exit 1; }
for tool in munged mungekey slurmctld slurmd sbatch squeue scancel sinfo scontrol; do
  command -v "$tool" >/dev/null || { echo "slurm test: $tool is missing: scripts/install-deps installs slurm-wlm and munge"; exit 1; }
done

W=$(mktemp -d /tmp/ferry-slurm-XXXXXX)
chmod 755 "$W"
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "slurm test: kept $W"; fi
}
trap cleanup EXIT
fail() {
  echo "slurm test: FAILED: $*"
  for f in "$W"/slurmctld.log "$W"/slurmd.log "$W"/munged.log "$W"/jobs/*.log; do
    [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }
  done
  exit 1
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  shift 2
  for _ in $(seq $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  fail "timed out after ${secs}s waiting for $what"
}

# munge: its own key and socket (the machine's munged, if any, is left alone).
mkdir -p "$W/munge" "$W/state" "$W/spool" "$W/jobs"
chmod 700 "$W/munge"
mungekey --create --keyfile="$W/munge/munge.key" --force 2>/dev/null || dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 2>/dev/null
chmod 400 "$W/munge/munge.key"
munged --force --foreground --key-file="$W/munge/munge.key" --socket="$W/munge/munge.sock" --pid-file="$W/munge/munged.pid" \
  --log-file="$W/munged.log" --seed-file="$W/munge/seed" >/dev/null 2>&1 &
pids+=($!)
wait_for 20 munged test -S "$W/munge/munge.sock"

node=$(hostname -s)
cpus=$(nproc)
port=$((20000 + RANDOM % 20000))
cat >"$W/slurm.conf" <<EOF
ClusterName=ferrytest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$W/munge/munge.sock
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$W/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" >"$W/slurmctld.out" 2>&1 &
pids+=($!)
wait_for 30 slurmctld scontrol ping
slurmd -D -f "$SLURM_CONF" -N "$node" >"$W/slurmd.out" 2>&1 &
pids+=($!)
node_up() { sinfo -h -N -o '%t' | grep -qE '^(idle|mix|alloc)'; }
wait_for 60 "the node to come up" node_up
echo "slurm test: cluster up ($node, $cpus CPUs, port $port)"

# REQUESTS requests of mixed lengths and token budgets; greedy.
python3 - "$W/batch.jsonl" "$REQUESTS" <<'PY'
import json, sys
words = ["In the beginning", "And God said", "Blessed are the", "The LORD is my", "Now the serpent was", "And it came to pass",
         "Let there be", "Thou shalt not", "Behold, I", "Unto thee"]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        prompt = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 4))
        body = {"prompt": prompt, "max_tokens": 48 + (i % 3) * 16}
        f.write(json.dumps({"custom_id": f"req-{i:04d}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
PY
"$FERRY" generate --model "$MODEL" --input "$W/batch.jsonl" --output "$W/single.jsonl" --threads 1 -q \
  || fail "the single-process run failed"
echo "slurm test: single run: $(wc -l <"$W/single.jsonl") records"

submit() {  # submit ARRAY: prints the job id
  SHARDS=4 MODEL=$MODEL INPUT=$W/batch.jsonl OUTPUT=$W/results.jsonl FERRY=$FERRY FERRY_ARGS="--batch-size 2" \
    sbatch --parsable --array="$1" --chdir="$W/jobs" --output="$W/jobs/ferry-%A_%a.log" "$SRC/scripts/slurm/ferry-array.sbatch"
}
job=$(submit 0-3) || fail "sbatch failed"
echo "slurm test: submitted array job $job"
# Cancel task 2 once it has written some records, before it finishes. The poll only reads files
# (squeue can stall for seconds on a loaded machine); the task's log says when it has finished.
shard2=$W/results.jsonl.shard-00002-of-00004
has_records() {
  [ -f "$shard2" ] && [ "$(wc -l <"$shard2")" -ge 2 ] && return 0
  grep -qs "$PER_SHARD/$PER_SHARD records" "$W/jobs/ferry-${job}_2.log"  # finished first: the check below says so
}
wait_for 300 "task 2 to write records" has_records
scancel "${job}_2"
cancelled=$(wc -l <"$shard2")
echo "slurm test: cancelled task ${job}_2 after $cancelled of $PER_SHARD records"
[ "$cancelled" -lt "$PER_SHARD" ] || fail "task 2 finished before it was cancelled"
array_done() { [ -z "$(squeue -h -j "$job" 2>/dev/null)" ]; }
wait_for 600 "the array to finish" array_done
# The merge refuses while a shard is incomplete, naming what is missing.
if "$FERRY" merge --input "$W/batch.jsonl" --output "$W/merged.jsonl" "$W"/results.jsonl.shard-*-of-00004 2>"$W/merge1.err"; then
  fail "merge accepted an incomplete shard"
fi
grep -qE "records in no shard|torn last record" "$W/merge1.err" || fail "merge did not name the missing records: $(cat "$W/merge1.err")"
echo "slurm test: merge refused the incomplete job: $(cut -c1-120 "$W/merge1.err")"
# Resubmit the cancelled task: it resumes its shard.
again=$(submit 2) || fail "resubmitting task 2 failed"
again_done() { [ -z "$(squeue -h -j "$again" 2>/dev/null)" ]; }
wait_for 600 "the resubmitted task to finish" again_done
grep -q "resuming after" "$W"/jobs/ferry-"${again}"_2.log || fail "the resubmitted task did not resume its shard"
for i in 0 1 2 3; do
  n=$(wc -l <"$W/results.jsonl.shard-0000$i-of-00004")
  [ "$n" = "$PER_SHARD" ] || fail "shard $i has $n records, not $PER_SHARD"
done
"$FERRY" merge --input "$W/batch.jsonl" --output "$W/merged.jsonl" "$W"/results.jsonl.shard-*-of-00004 || fail "merge failed"
cmp "$W/merged.jsonl" "$W/single.jsonl" || fail "the merged output differs from the single run"
ids=$(python3 -c "import json,sys; ids=[json.loads(l)['custom_id'] for l in open(sys.argv[1])]; print(len(ids), len(set(ids)))" "$W/merged.jsonl")
[ "$ids" = "$REQUESTS $REQUESTS" ] || fail "merged ids: $ids"
echo "slurm test: PASSED: 4-task array, task 2 cancelled at $cancelled/$PER_SHARD and resubmitted; merged $REQUESTS records equal the single run byte for byte (0 lost, 0 duplicated)"
