#!/usr/bin/env bash
# A real Slurm job array over rmboost: starts a one-node Slurm cluster from Debian's packages
# (munged, slurmctld, slurmd; no systemd, no cgroups, no accounting), submits
# deploy/slurm/rmboost-array.sbatch as a TASKS-task array in which each task runs
# `rmboost generate --shard auto` against BASE_URL, then its merge step as a dependent job
# (`rmboost merge ... --input PROMPTS`), and checks that every prompt's id is in the merged file
# exactly once.
#
#     scripts/slurm-test.sh RMBOOST_BINARY BASE_URL PROMPTS.jsonl OUT_DIR [TASKS]
#
# BASE_URL is a running OpenAI-compatible server the tasks reach (the tests' loopback server:
# the tasks run on this machine). OUT_DIR gets parts/part-I.jsonl, pairs.jsonl and the tasks'
# logs (logs/). Everything Slurm and munge write (configuration, state, spool, logs, socket)
# is under a temporary directory, removed at the end; the daemons are stopped by PID.
#
# Needs root (slurmd runs jobs as their user; munged runs as the `munge` user) and the
# packages: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (scripts/test.sh installs them). Exit status 0 when the array ran and the merge checked out.
set -euo pipefail

start=$SECONDS
log() { echo "slurm-test: [$((SECONDS - start)) s] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -ge 4 ] || die "usage: $0 RMBOOST_BINARY BASE_URL PROMPTS.jsonl OUT_DIR [TASKS]"
bin="$(realpath "$1")"
base_url="$2"
prompts="$(realpath "$3")"
out="$4"
tasks="${5:-4}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sbatch_script="$root/deploy/slurm/rmboost-array.sbatch"

[ -x "$bin" ] || die "no rmboost binary at $1"
[ -f "$prompts" ] || die "no prompts at $3"
[ "$(id -u)" = 0 ] || die "needs root (slurmd and munged are started here)"
for tool in munged mungekey slurmctld slurmd sbatch squeue scontrol; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
done
id munge >/dev/null 2>&1 || die "no munge user (the munge package creates it)"

mkdir -p "$out"
out="$(realpath "$out")"
tmp="$(mktemp -d /tmp/rmboost-slurm.XXXXXX)"
chmod 755 "$tmp"
pids=()
cleanup() {
    local status=$?
    # The daemons, newest first, each by its PID.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$status" != 0 ]; then
        for f in "$tmp"/log/*.log; do
            [ -f "$f" ] || continue
            log "--- last lines of $(basename "$f")"
            tail -n 20 "$f" >&2 || true
        done
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# munge: our own daemon on our own socket, as the munge user, with the package's key.
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
    log "creating the munge key $key"
    mkdir -p /etc/munge
    mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    chown munge:munge "$key"
    chmod 600 "$key"
fi
mkdir -p /run/munge "$tmp/munge" "$tmp/log" "$tmp/state" "$tmp/spool"
chown munge:munge /run/munge "$tmp/munge"
chmod 755 "$tmp/munge"
socket="$tmp/munge/munge.socket"
runuser -u munge -- munged --foreground --key-file="$key" --socket="$socket" \
    --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/munged.seed" \
    --log-file="$tmp/munge/munged.log" >"$tmp/log/munged.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || die "munged did not start: $(cat "$tmp/log/munged.log" "$tmp/munge/munged.log" 2>/dev/null)"

# Two free ports for slurmctld and slurmd (another cluster on this machine keeps its own).
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}
ctld_port="$(free_port)"
slurmd_port="$(free_port)"
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done

host="$(hostname -s)"
node="$(slurmd -C | head -n 1)"
case "$node" in NodeName=*) ;; *) die "slurmd -C printed no node line: $node" ;; esac
export SLURM_CONF="$tmp/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=rmboosttest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
# sbatch --wait polls every 2 s while that is under MinJobAge/2, else 4 times longer (up to
# 32 s): a short MinJobAge keeps the polls at 2 s (and ended jobs are purged 4 s later).
MinJobAge=4
$node NodeAddr=127.0.0.1 State=UNKNOWN
# Up to 4 jobs share a core: the tasks wait on the model server, not on the CPU.
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

slurmctld -D -i >"$tmp/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D >"$tmp/log/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    state="$(sinfo -h -o %t 2>/dev/null || true)"
    case "$state" in idle* | mix* | alloc*) break ;; esac
    sleep 0.1
done
case "$state" in idle* | mix* | alloc*) ;; *) die "the node did not come up (sinfo: ${state:-nothing})" ;; esac
log "Slurm is up on $host (node state $state)"

if [ -n "${SLURM_TEST_PROBE:-}" ]; then
    # Development aid: print what Slurm sets for an array spec, e.g. SLURM_TEST_PROBE=0-6:2.
    sbatch --wait --array="$SLURM_TEST_PROBE" --output="$tmp/log/probe-%a.out" \
        --wrap 'echo $(env | grep "^SLURM_ARRAY_TASK" | sort)' >/dev/null
    cat "$tmp"/log/probe-*.out
    exit 0
fi

# The array, then the merge as a job that depends on it, as deploy/README.md shows.
rm -rf "$out/parts" "$out/logs" "$out/pairs.jsonl"
mkdir -p "$out/logs"
export RMBOOST_BIN="$bin" RMBOOST_BASE_URL="$base_url" RMBOOST_MODEL_NAME=test \
    RMBOOST_INPUT="$prompts" RMBOOST_PARTS="$out/parts" RMBOOST_OUTPUT="$out/pairs.jsonl"
cd "$out"
t0=$SECONDS
array="$(sbatch --parsable --array="0-$((tasks - 1))" --output="$out/logs/task-%a.out" \
    --error="$out/logs/task-%a.err" "$sbatch_script")"
array="${array%%;*}"
log "submitted array job $array ($tasks tasks)"
sbatch --wait --dependency="afterany:$array" --job-name=rmboost-merge \
    --output="$out/logs/merge.out" --error="$out/logs/merge.err" \
    --wrap "bash '$sbatch_script' merge" >/dev/null ||
    die "the merge job failed: $(cat "$out/logs/merge.err" 2>/dev/null)"
log "array and merge done in $((SECONDS - t0)) s"

# Every task took its own shard from Slurm, and wrote its part.
for ((i = 0; i < tasks; i++)); do
    part="$out/parts/part-$i.jsonl"
    [ -f "$part" ] || die "task $i wrote no $part: $(cat "$out/logs/task-$i.err" 2>/dev/null)"
    grep -q "shard $i/$tasks from SLURM_ARRAY_TASK_ID" "$out/logs/task-$i.out" "$out/logs/task-$i.err" ||
        die "task $i's log does not say it took shard $i/$tasks from SLURM_ARRAY_TASK_ID"
done
# Every id exactly once (merge --input already refused a missing one; count them too).
want="$(grep -c . "$prompts")"
got="$(grep -c . "$out/pairs.jsonl")"
ids="$(grep -o '"id": *"[^"]*"' "$out/pairs.jsonl" | sort | uniq | wc -l)"
[ "$got" = "$want" ] || die "the merged file has $got lines for $want prompts"
[ "$ids" = "$want" ] || die "the merged file has $ids distinct ids for $want prompts"
parts_total=0
for ((i = 0; i < tasks; i++)); do
    parts_total=$((parts_total + $(grep -c . "$out/parts/part-$i.jsonl" || true)))
done
[ "$parts_total" = "$want" ] || die "the parts hold $parts_total lines for $want prompts"
echo "slurm-test: ok: $tasks tasks, $got examples merged, every id once"
