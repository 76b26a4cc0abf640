#!/usr/bin/env bash
# Stop the test cluster that start_cluster.sh STATE_DIR started: cancel its jobs, stop slurmd,
# slurmctld and munged by their pid files, then SIGKILL whatever of it is left (daemons,
# slurmstepd and job processes). Bounded (about 40 s at worst, about a second usually) and idempotent.
#
# Usage: stop_cluster.sh STATE_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
[[ -d $1 ]] || exit 0
STATE_DIR=$(cd "$1" && pwd -P)
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$STATE_DIR/slurm.conf

alive() {
    # A zombie is not alive, though `kill -0` says so until its parent reaps it.
    [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

wait_gone() {
    # wait_gone SECONDS PID...: true once none of the PIDs is alive.
    local deadline=$((SECONDS + $1)) pid any
    shift
    while true; do
        any=""
        for pid in "$@"; do
            alive "$pid" && any=1 && break
        done
        [[ -z $any ]] && return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

pid_of() {
    # The pid in run/NAME.pid if that process is alive and still is NAME (pids get reused).
    local pid
    pid=$(cat "$STATE_DIR/run/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    grep -q "$1" "/proc/$pid/comm" 2>/dev/null || return 1
    echo "$pid"
}

# Processes of this cluster, never this script or its ancestors: the daemons carry
# SLURM_TEST_CLUSTER=STATE_DIR, slurmstepd and job processes carry this SLURM_CONF (job
# processes from the sbatch environment). With `jobs`, only job processes (SLURM_JOB_ID set).
cluster_pids() {
    local ancestors=" " p=$$ proc pid env
    while [[ $p =~ ^[0-9]+$ && $p -gt 1 ]]; do
        ancestors+="$p "
        p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || break
    done
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [[ $ancestors == *" $pid "* ]] && continue
        alive "$pid" || continue
        env=$(tr '\0' '\n' 2>/dev/null <"$proc/environ") || continue
        if [[ ${1:-} == jobs ]]; then
            grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env" ||
                continue
        else
            grep -qxF -e "SLURM_TEST_CLUSTER=$STATE_DIR" -e "SLURM_CONF=$SLURM_CONF" <<<"$env" ||
                continue
        fi
        echo "$pid"
    done
}

queue_empty() {
    [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null || echo unknown) ]]
}

wait_queue_empty() {
    local deadline=$((SECONDS + $1))
    until queue_empty; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

kill_all() {
    if (($# > 0)); then
        kill -KILL "$@" 2>/dev/null || true
        wait_gone 5 "$@" || true
    fi
}

# 1. Cancel every job, then SIGKILL the job processes: Slurm itself would give them KillWait
# (60 s) after SIGTERM, also for `scancel --signal=KILL`. Their steps then end within seconds.
if pid_of slurmctld >/dev/null; then
    timeout 10 scancel --quiet --user=root 2>/dev/null || true
fi
mapfile -t pids < <(cluster_pids jobs)
kill_all "${pids[@]}"
if pid_of slurmctld >/dev/null; then
    wait_queue_empty 10 || true
fi

# 2. The daemons, by pid file: SIGTERM, then SIGKILL.
pids=()
for name in slurmd slurmctld; do
    if pid=$(pid_of "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
done
if ((${#pids[@]})) && ! wait_gone 10 "${pids[@]}"; then
    kill_all "${pids[@]}"
fi
if pid=$(pid_of munged); then
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone 5 "$pid" || kill_all "$pid"
fi

# 3. Leftovers: slurmstepd, job processes, a daemon whose pid file is gone.
mapfile -t pids < <(cluster_pids)
kill_all "${pids[@]}"
rm -f "$STATE_DIR"/run/*.pid
exit 0
