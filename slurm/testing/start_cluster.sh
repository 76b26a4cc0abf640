#!/usr/bin/env bash
# Start a real single-node Slurm cluster (munged + slurmctld + slurmd) whose every file lives
# under STATE_DIR, for tests. Nothing under /etc is written and nothing is exported: callers put
# SLURM_CONF=STATE_DIR/slurm.conf in the environment of sbatch/srun/squeue/scontrol/sinfo.
#
# Usage: start_cluster.sh STATE_DIR
# Exit codes: 0 started (last stdout line: `export SLURM_CONF=...`); 3 this machine cannot run it
# (not root, or apt cannot install Slurm/munge) with a one-line reason on stderr, which tests turn
# into a skip; anything else is a real failure, reported with the tails of the daemon logs.
# Stop it with stop_cluster.sh STATE_DIR.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
mkdir -p "$1"
STATE_DIR=$(cd "$1" && pwd -P)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
START_TIMEOUT_S=${SLURM_TEST_START_TIMEOUT_S:-60}

skip() {
    echo "$*" >&2
    exit 3
}

# --- 1. the packages -------------------------------------------------------------------------
if [[ $(id -u) -ne 0 ]]; then
    skip "start_cluster.sh needs root (to run slurmd and install Slurm), running as uid $(id -u)"
fi
# The daemons live in sbin, which a non-login root shell may lack.
export PATH=$PATH:/usr/sbin:/sbin
missing() {
    local tool
    for tool in sbatch srun scontrol slurmctld slurmd munged; do
        command -v "$tool" >/dev/null 2>&1 || return 0
    done
    return 1
}
if missing; then
    command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed and there is no apt-get"
    packages=(slurmctld slurmd slurm-client munge)
    apt_install() {
        DEBIAN_FRONTEND=noninteractive timeout 180 apt-get install -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${packages[@]}" >"$STATE_DIR/apt.log" 2>&1
    }
    if ! apt_install; then
        # Only a stale or missing package list needs an update; it is slow, so not by default.
        timeout 120 apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 ||
            skip "apt-get update failed (see $STATE_DIR/apt.log)"
        apt_install || skip "apt-get install ${packages[*]} failed (see $STATE_DIR/apt.log)"
    fi
    missing && skip "Slurm/munge binaries still missing after apt-get install"
fi

# --- 2. the files ----------------------------------------------------------------------------
NODE=$(hostname -s)
mkdir -p "$STATE_DIR"/{munge,state,spool,log,run}
# munged refuses directories that others may write to, a key others may read, and a socket
# directory that others may not enter.
chmod 0755 "$STATE_DIR/munge" "$STATE_DIR/log"
chmod 0700 "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/run"
MUNGE_KEY=$STATE_DIR/munge/munge.key
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket
if [[ ! -s $MUNGE_KEY ]]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
fi
chown root:root "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

port_is_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
pick_port() {
    local port tries
    for tries in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if [[ $port != "${1:-}" ]] && port_is_free "$port" && ! ss -Htln "sport = :$port" 2>/dev/null |
            grep -q .; then
            echo "$port"
            return 0
        fi
    done
    echo "no free TCP port found" >&2
    return 1
}
CTLD_PORT=$(pick_port)
SLURMD_PORT=$(pick_port "$CTLD_PORT")
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

cat >"$STATE_DIR/slurm.conf" <<EOF
# Written by $HERE/start_cluster.sh for a throwaway test cluster.
ClusterName=testcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s by
# default; the minimum Slurm accepts is 5).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# linuxproc tracks a step's processes by parentage, so a signal to the step reaches every
# descendant, also one that started its own session (torchrun's workers do).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Jobs start within a second of submission. (Time limits and '--signal=SIG@N' are checked on a
# fixed 30 s timer of slurmctld that no setting changes: the signal goes out at the first check
# that finds at most N+30 s left, and a job past its limit is ended at the next check.)
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
KillWait=60
MinJobAge=300
ReturnToService=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
# Lets the node declare more CPUs than this machine has, so several small jobs run at once.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=8 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# --- 3. the daemons --------------------------------------------------------------------------
fail() {
    echo "start_cluster.sh: $*" >&2
    local log
    for log in "$STATE_DIR/log/munged.log" "$STATE_DIR/log/slurmctld.log" \
        "$STATE_DIR/log/slurmd.log" "$STATE_DIR/log/daemons.out"; do
        if [[ -f $log ]]; then
            echo "----- tail of $log -----" >&2
            tail -n 40 "$log" >&2
        fi
    done
    "$HERE/stop_cluster.sh" "$STATE_DIR" >&2 || true
    exit 1
}
# Each daemon forks into the background; its stdio goes to a file so that it never holds the
# caller's pipes open. SLURM_TEST_CLUSTER marks its processes (and slurmstepd's) for
# stop_cluster.sh.
start_daemon() {
    SLURM_TEST_CLUSTER=$STATE_DIR SLURM_CONF=$STATE_DIR/slurm.conf \
        "$@" </dev/null >>"$STATE_DIR/log/daemons.out" 2>&1
}

SECONDS=0
# --force: STATE_DIR may sit in a directory only root can enter (pytest's tmp dirs are 0700);
# munged would refuse that for a socket other users need, but only root uses this one.
start_daemon munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
    --pid-file="$STATE_DIR/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munged.seed" || fail "munged did not start"
until munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; do
    ((SECONDS < 10)) || fail "munged does not answer on $MUNGE_SOCKET"
    sleep 0.2
done

start_daemon slurmctld -f "$STATE_DIR/slurm.conf" || fail "slurmctld did not start"
start_daemon slurmd -f "$STATE_DIR/slurm.conf" || fail "slurmd did not start"

export SLURM_CONF=$STATE_DIR/slurm.conf
alive() {
    local pid
    pid=$(cat "$STATE_DIR/run/$1.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null
}
state=""
SECONDS=0
while true; do
    state=$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    [[ $state == idle ]] && break
    ((SECONDS < START_TIMEOUT_S)) ||
        fail "node $NODE not idle after ${START_TIMEOUT_S}s (sinfo: '${state}')"
    if ((SECONDS > 3)); then
        alive slurmctld || fail "slurmctld exited"
        alive slurmd || fail "slurmd exited"
    fi
    sleep 0.3
done

echo "Slurm test cluster up: node $NODE, slurmctld port $CTLD_PORT, slurmd port $SLURMD_PORT"
echo "export SLURM_CONF=$STATE_DIR/slurm.conf"
