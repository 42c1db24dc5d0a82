#!/usr/bin/env bash
# (from ../shared/notes/recipes, verified on this kind of machine; used by .ci/run and the tests)
# stop-local-slurm.sh [--purge] -- stop what start-local-slurm.sh started,
# by PID file only. --purge also deletes Slurm state, spool, logs and the
# MariaDB datadir (next start = fresh cluster, job ids restart at 1).
set -uo pipefail
LAB=${SLURMLAB_DIR:-${TMPDIR:-/tmp}/orchd-slurm}
RUN=$LAB/run
export SLURM_CONF=$LAB/etc/slurm.conf

# pid file names a live, non-zombie process (PID 1 here may reap late)
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null &&
  ! grep -q '^[0-9]* (.*) Z' "/proc/$p/stat" 2>/dev/null; }
stop_pidfile() { # stop_pidfile <pidfile> <name>
  local pf=$1
  alive "$pf" || return 0
  local pid; pid=$(cat "$pf")
  echo "[$(date +%T.%3N)] stopping $2 (pid $pid)"
  kill "$pid"
  local end=$((SECONDS + 30))
  while alive "$pf" && [ $SECONDS -lt $end ]; do sleep 0.1; done
  alive "$pf" && { echo "  $2 still alive, SIGKILL"; kill -9 "$pid"; }
  return 0
}

# running jobs: their slurmstepd/job processes would outlive slurmd
if alive "$RUN/slurmctld.pid"; then
  scancel --state=RUNNING,PENDING 2>/dev/null || true
  sleep 1
fi
for pf in "$RUN"/slurmd-*.pid; do
  [ -e "$pf" ] || continue
  stop_pidfile "$pf" "slurmd $(basename "$pf" .pid)"
done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
stop_pidfile "$RUN/mysql/mysqld.pid" mariadbd
if [ -e "$RUN/munged.started-by-lab" ]; then
  stop_pidfile /run/munge/munged.pid munged
  rm -f "$RUN/munged.started-by-lab"
fi
# leftover slurmstepd processes (jobs that ignored SIGTERM) -- by PID only
# (identified by the SLURM_CONF our slurmd passed down to them)
for p in $(pgrep -x slurmstepd 2>/dev/null); do
  if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "SLURM_CONF=$LAB/etc/slurm.conf"; then
    echo "killing leftover slurmstepd $p"; kill "$p" 2>/dev/null
  fi
done

if [ "${1:-}" = --purge ]; then
  echo "purging state under $LAB"
  rm -rf "$LAB/state" "$LAB/mysql" "$LAB/log" "$RUN"
  for f in slurm.conf gres.conf; do
    [ -L /etc/slurm/$f ] && [ "$(readlink /etc/slurm/$f)" = "$LAB/etc/$f" ] && rm -f /etc/slurm/$f
  done
fi
echo "stopped"
