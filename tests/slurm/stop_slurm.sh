#!/usr/bin/env bash
# Stop what tests/slurm/start_slurm.sh started from DIR (default /tmp/slurm-test): cancel the jobs left, stop
# slurmd, slurmctld and munged by their pid files under DIR/run, and remove the /etc/slurm files that script
# wrote (only those carrying its marker line). A daemon without a pid file there is left alone.
set -euo pipefail

DIR="${1:-/tmp/slurm-test}"
RUN="$DIR/run"
MARK="# Written by tests/slurm/start_slurm.sh"

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1" 2>/dev/null || echo 0)" 2>/dev/null; }

if alive "$RUN/slurmctld.pid"; then
    timeout 20 scancel --quiet --user="$(id -un)" 2>/dev/null || true
fi

stop() {  # SIGTERM, wait up to 15 s, then SIGKILL
    local pidfile="$RUN/$1.pid" pid
    [[ -s "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

stop slurmd
stop slurmctld
stop munged
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [[ -f "$f" ]] && head -n1 "$f" | grep -qF "$MARK"; then rm -f "$f"; fi
done
echo "stop_slurm: stopped the daemons started from $DIR" >&2
