#!/usr/bin/env bash
# slurm-local-stop.sh -- tear down the cluster started by scripts/slurm-local-start.sh.
#
# Stops only the daemons whose pid files live in $SLURM_LOCAL_DIR/run, by PID, after
# checking that each PID really is the expected program (no pkill/killall by name).
# Order: cancel jobs -> {slurmd, slurmctld} -> slurmdbd -> {mariadbd, munged}.
# Then removes the /etc/slurm/slurm.conf symlink if the start script created it, and
# deletes $SLURM_LOCAL_DIR unless SLURM_LOCAL_KEEP_DIR=1 (e.g. to upload logs from CI).
set -uo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
KEEP_DIR=${SLURM_LOCAL_KEEP_DIR:-0}
export SLURM_CONF=$D/etc/slurm.conf
export PATH=/usr/sbin:/sbin:$PATH

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm-local-stop %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }

# term_pid <name>: send SIGTERM to the daemon whose pid is in $D/run/<name>.pid, after
# checking /proc/<pid>/comm really is <name> (never kills a recycled, unrelated pid).
# Prints the pid it signalled.
term_pid() {
  local name=$1 pidfile=$D/run/$1.pid pid comm
  [[ -s $pidfile ]] || return 0          # never started (e.g. no accounting) or already gone
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then log "$name: pid $pid not running" >&2; rm -f "$pidfile"; return 0; fi
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  if [[ $comm != "$name" ]]; then
    log "$name: pid $pid is '$comm', not $name -- leaving it alone" >&2; return 0
  fi
  kill -TERM "$pid" && echo "$pid"
}

# stop_group <timeout s> <name>...: SIGTERM all named daemons at once, wait for them to
# exit, SIGKILL whatever is still alive after the timeout.
stop_group() {
  local secs=$1; shift
  local -A pids=()
  local name pid
  for name in "$@"; do pid=$(term_pid "$name"); [[ -n $pid ]] && pids[$name]=$pid; done
  for ((i = 0; i < secs * 10 && ${#pids[@]} > 0; i++)); do
    for name in "${!pids[@]}"; do
      if ! kill -0 "${pids[$name]}" 2>/dev/null; then
        log "$name (pid ${pids[$name]}) stopped"; rm -f "$D/run/$name.pid"; unset "pids[$name]"
      fi
    done
    sleep 0.1
  done
  for name in "${!pids[@]}"; do
    log "$name (pid ${pids[$name]}) ignored SIGTERM for ${secs}s, sending SIGKILL"
    kill -KILL "${pids[$name]}" 2>/dev/null || true; rm -f "$D/run/$name.pid"
  done
}

if [[ -s $D/run/slurmctld.pid ]] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
  # 1. cancel every job of this private cluster and let the steps finish, so that no
  #    slurmstepd / job process outlives slurmd (they are not children of slurmd).
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [[ -n ${jobs// } ]]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do      # up to 30 s (KillWait=5 + epilog)
      [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
fi

# 2. daemons, in three waves (each daemon needs ~2 s to exit after SIGTERM)
stop_group 30 slurmd slurmctld        # slurmctld saves its state on SIGTERM
stop_group 30 slurmdbd                # after slurmctld: it may flush accounting records
stop_group 60 mariadbd munged         # clean InnoDB shutdown on SIGTERM; munge last-ish

# 3. report any slurmstepd that still belongs to this cluster (its spool dir is ours)
for p in /proc/[0-9]*; do
  [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] || continue
  if ls -l "$p/cwd" 2>/dev/null | grep -q "$D/spool"; then
    log "WARNING: leftover slurmstepd pid ${p#/proc/} (cwd in $D/spool); kill it by that pid if needed"
  fi
done

# 4. cgroup mode (SLURM_LOCAL_CGROUP=1, cgroup v1): slurmd leaves empty
#    /sys/fs/cgroup/<controller>/slurm_<host> trees behind; rmdir only removes empty dirs
if [[ -s $D/run/cgroup-mode ]]; then
  host=$(cat "$D/run/cgroup-mode")
  for top in /sys/fs/cgroup/*/slurm_"$host" /sys/fs/cgroup/slurm_"$host"; do
    [[ -d $top ]] && find "$top" -depth -type d -exec rmdir {} \; 2>/dev/null
    [[ -d $top ]] && log "WARNING: could not remove $top (still in use?)"
  done
fi

if [[ -s $D/run/etc-link ]]; then
  link=$(cat "$D/run/etc-link")
  if [[ -L $link && $(readlink "$link") == "$D/etc/slurm.conf" ]]; then rm -f "$link"; log "removed $link"; fi
fi

if [[ $KEEP_DIR == 1 ]]; then
  log "kept $D (logs in $D/log)"
else
  rm -rf "$D"
  log "removed $D"
fi
