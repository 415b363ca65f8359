#!/usr/bin/env bash
# Start a real single-node SLURM (munge + slurmctld + slurmd) with one fake GPU, for tests/test_slurm.py.
#
#   tests/slurm/start_slurm.sh [DIR]      DIR defaults to /tmp/slurm-test
#
# State, spool, logs and pid files go under DIR (state/ spool/ log/ run/). The configuration is written to
# /etc/slurm/slurm.conf and /etc/slurm/gres.conf, where the job steps started inside a job look for it (the
# Snakemake job-step plugin clears SLURM_* variables, SLURM_CONF included, before its nested `srun`); both
# carry a marker line, and a configuration without it (a real cluster's) is never overwritten. Installs
# slurm-wlm and munge with apt-get when missing and creates /etc/munge/munge.key when there is none (root, as
# in CI). Idempotent: daemons that run already (by their pid files) are kept, and the script returns once the
# node is idle. Exits non-zero with the reason on stderr when SLURM cannot be started.
# Stop it with tests/slurm/stop_slurm.sh [DIR].
set -euo pipefail

DIR="$(mkdir -p "${1:-/tmp/slurm-test}" && cd "${1:-/tmp/slurm-test}" && pwd)"
RUN="$DIR/run" LOG="$DIR/log"
CONF=/etc/slurm/slurm.conf GRES=/etc/slurm/gres.conf
MARK="# Written by tests/slurm/start_slurm.sh"
HOST="$(hostname -s)"

log() { echo "start_slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1" 2>/dev/null || echo 0)" 2>/dev/null; }
ours() { [[ ! -e "$1" ]] || [[ "$(head -n1 "$1")" == "$MARK"* ]]; }
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

wait_idle() {  # the node must be usable (idle, or mixed/allocated when jobs remain) within $1 seconds
    local deadline=$((SECONDS + $1)) state=""
    while ((SECONDS < deadline)); do
        state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle|mixed|allocated) log "node $HOST is $state"; return 0 ;;
            down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node state after $1 s: '${state:-no answer}'"
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
    return 1
}

[[ "$(id -u)" == 0 ]] || die "needs root (slurmd, /etc/slurm, apt-get)"

# Already running from DIR: only wait for the node.
if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" && munge_ok; then
    wait_idle 30 || die "SLURM from $DIR runs but its node is not usable"
    exit 0
fi

# 1. Packages.
mkdir -p "$RUN" "$LOG" "$DIR/state" "$DIR/spool"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt-get output in $LOG/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update && apt-get install -y slurm-wlm munge; } >"$LOG/apt.log" 2>&1 \
        || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install slurm-wlm munge failed"; }
fi
ours "$CONF" || die "$CONF exists and was not written by this script: not overwriting a real cluster's configuration"
ours "$GRES" || die "$GRES exists and was not written by this script"

# 2. munge: a key, then the daemon (as root, hence --force).
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
if munge_ok; then
    log "munged answers already (not started by this script, not stopped by stop_slurm.sh)"
else
    munged --force --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        || die "munged did not start (see $LOG/munged.log)"
    for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
    munge_ok || die "munge does not answer (see $LOG/munged.log)"
fi

# 3. Configuration: this host, all its CPUs, memory below what is available, one fake GPU backed by /dev/null.
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"   # nproc alone obeys OMP_NUM_THREADS
AVAIL_MB="$(free -m | awk '/^Mem:/ {print ($7 != "" ? $7 : $4)}')"   # 'available' (else 'free')
MEM_MB=$((AVAIL_MB * 8 / 10))
((MEM_MB >= 2000)) || die "only ${AVAIL_MB} MiB available: not enough for test jobs"
mkdir -p /etc/slurm
cat >"$CONF" <<CONF
$MARK for a throw-away single-node test cluster ($DIR).
ClusterName=perturbtest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:fake:1 State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
cat >"$GRES" <<CONF
$MARK
NodeName=$HOST Name=gpu Type=fake File=/dev/null
CONF

# 4. Daemons: the controller (-c: forget jobs and state of an earlier run), then the node daemon.
alive "$RUN/slurmctld.pid" || slurmctld -c || die "slurmctld did not start (see $LOG/slurmctld.log)"
for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
scontrol ping 2>/dev/null | grep -q UP || { tail -n 30 "$LOG/slurmctld.log" >&2 || true; die "slurmctld does not answer"; }
alive "$RUN/slurmd.pid" || slurmd -c || die "slurmd did not start (see $LOG/slurmd.log)"
for _ in $(seq 20); do alive "$RUN/slurmd.pid" && break; sleep 0.5; done
alive "$RUN/slurmd.pid" || { tail -n 30 "$LOG/slurmd.log" >&2 || true; die "slurmd exited"; }

wait_idle 60 || die "the node did not become idle"
