#!/usr/bin/env bash
# slurm-local-start.sh -- bring up a real, single-node Slurm cluster on localhost for the
# `slurm`-marked tests and CI (.ci/run). Tested on Debian 12 "bookworm", Slurm 22.05.8,
# MUNGE 0.5.15, MariaDB 10.11, running as root inside a VM/container without systemd.
# Adapted from the recipe in the project's reference notes; idempotent: when the cluster in
# $SLURM_LOCAL_DIR is already up it says so and exits 0.
#
# What it starts (all state, sockets, logs and pid files live under $SLURM_LOCAL_DIR):
#   munged      private key + private socket (does not touch /etc/munge or /run/munge)
#   mariadbd    private datadir, TCP 127.0.0.1:$SLURM_LOCAL_MYSQL_PORT  (only if accounting is on)
#   slurmdbd    accounting daemon -> makes `sacct` work                 (only if accounting is on)
#   slurmctld   controller, partition "debug" (Default=YES)
#   slurmd      the one compute node, named after `hostname -s`
# Partitions: debug (Default=YES) and urgent (higher PriorityTier: preempts+requeues debug jobs).
#
# Usage:
#   sudo scripts/slurm-local-start.sh      # install missing packages, start everything
#   source /tmp/slurm-local/env.sh         # exports SLURM_CONF for sinfo/sbatch/submitit
#   scripts/slurm-local-stop.sh            # stop everything (by PID) and delete the dir
#
# Environment knobs (all optional):
#   SLURM_LOCAL_DIR=/tmp/slurm-local   where everything lives (wiped on start unless KEEP_STATE=1)
#   SLURM_LOCAL_ACCOUNTING=1           1: MariaDB + slurmdbd so `sacct` works (submitit needs
#                                      sacct to notice jobs that end without a result, e.g.
#                                      scancel'ed or killed jobs); 0: accounting_storage/none
#   SLURM_LOCAL_INSTALL=1              apt-get install missing packages (apt-get update on failure)
#   SLURM_LOCAL_INSTALL_ONLY=0         1: install the packages, start nothing
#   SLURM_LOCAL_KEEP_STATE=0           1: keep StateSaveLocation/db between runs
#   SLURM_LOCAL_LINK_ETC=1             symlink /etc/slurm/slurm.conf -> our slurm.conf if that
#                                      file does not exist, so SLURM_CONF is not even needed
#   SLURM_LOCAL_CTLD_PORT=6817 SLURM_LOCAL_SLURMD_PORT=6818
#   SLURM_LOCAL_DBD_PORT=6819  SLURM_LOCAL_MYSQL_PORT=3306
#   SLURM_LOCAL_CGROUP=0               1: proctrack/cgroup + task/cgroup (needs a writable
#                                      cgroup hierarchy; leave 0 in containers)
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
INSTALL=${SLURM_LOCAL_INSTALL:-1}
INSTALL_ONLY=${SLURM_LOCAL_INSTALL_ONLY:-0}
KEEP_STATE=${SLURM_LOCAL_KEEP_STATE:-0}
LINK_ETC=${SLURM_LOCAL_LINK_ETC:-1}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
DBD_PORT=${SLURM_LOCAL_DBD_PORT:-6819}
MYSQL_PORT=${SLURM_LOCAL_MYSQL_PORT:-3306}
CGROUP=${SLURM_LOCAL_CGROUP:-0}
DB_USER=slurm
DB_PASS=slurmpw            # only reachable on 127.0.0.1, throwaway CI database
DB_NAME=slurm_acct_db

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm-local-start %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() {
  echo "[slurm-local-start] ERROR: $*" >&2
  echo "[slurm-local-start] daemons started so far keep running: run scripts/slurm-local-stop.sh (SLURM_LOCAL_KEEP_DIR=1 keeps the logs)" >&2
  exit 1
}

# wait_for <seconds> <description> <command...>: poll every 0.2 s until the command succeeds
wait_for() {
  local secs=$1 what=$2; shift 2
  local n=$(( secs * 5 ))
  for ((i = 0; i < n; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "timed out after ${secs}s waiting for: $what (see $D/log/)"
}

# pid_alive <pidfile>: true if the pid file exists and names a live process
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) -eq 0 ]] || die "run as root (daemons run as root with SlurmUser=root)"

# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client)
BINS=(munged slurmctld slurmd sbatch)
if [[ $ACCOUNTING == 1 ]]; then
  PKGS+=(slurmdbd mariadb-server)
  BINS+=(slurmdbd mariadbd)
fi
missing=0
for b in "${BINS[@]}"; do command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing=1; done
if [[ $missing == 1 ]]; then
  [[ $INSTALL == 1 ]] || die "slurm/munge binaries missing and SLURM_LOCAL_INSTALL=0"
  log "installing ${PKGS[*]} (apt-get, --no-install-recommends)"
  export DEBIAN_FRONTEND=noninteractive
  # postinst scripts try to start the services through invoke-rc.d; without systemd/with
  # policy-rc.d that is refused, which is harmless: we start the daemons ourselves below.
  if ! apt-get install -y --no-install-recommends "${PKGS[@]}" >/tmp/slurm-local-apt.log 2>&1; then
    apt-get update >/tmp/slurm-local-apt-update.log 2>&1 || true
    apt-get install -y --no-install-recommends "${PKGS[@]}" >/tmp/slurm-local-apt.log 2>&1 \
      || die "apt-get install failed (is a Debian mirror reachable?), see /tmp/slurm-local-apt.log"
  fi
fi
export PATH=/usr/sbin:/sbin:$PATH
if [[ $INSTALL_ONLY == 1 ]]; then log "packages present: ${PKGS[*]}"; exit 0; fi

# ---------------------------------------------------------------- already up?
if pid_alive "$D/run/slurmctld.pid" && pid_alive "$D/run/slurmd.pid" \
   && SLURM_CONF=$D/etc/slurm.conf scontrol ping >/dev/null 2>&1; then
  log "cluster in $D is already running: $(SLURM_CONF=$D/etc/slurm.conf sinfo -h -o '%P/%a/%t/%N' | tr '\n' ' ')"
  exit 0
fi

# ---------------------------------------------------------------- 2. directory layout
for f in munged.pid mariadbd.pid slurmdbd.pid slurmctld.pid slurmd.pid; do
  pid_alive "$D/run/$f" && die "$f in $D/run is alive but the cluster does not answer: run scripts/slurm-local-stop.sh first"
done
if [[ $KEEP_STATE != 1 ]]; then rm -rf "$D"; fi
mkdir -p "$D"/{etc,log,run,state,spool/slurmd,munge,mysql}
chmod 755 "$D" "$D/run"     # munged insists that every dir on the socket path is world-x
chmod 700 "$D/munge"        # the key dir stays private

HOST=$(hostname -s)
NCPU=$(nproc)
# Node line straight from the hardware probe (CPUs/Boards/Sockets/Cores/Threads/RealMemory);
# declare ~90% of RAM so slurmd never reports "Low RealMemory" and drains the node.
NODE_HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)

# ---------------------------------------------------------------- 3. munge
MUNGE_SOCKET=$D/run/munge.socket
if [[ ! -s $D/munge/munge.key ]]; then
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$D/munge/munge.key" --bits=1024
  else
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1 count=1024 status=none
  fi
  chmod 600 "$D/munge/munge.key"
fi
log "starting munged"
munged --socket="$MUNGE_SOCKET" --key-file="$D/munge/munge.key" \
       --pid-file="$D/run/munged.pid" --seed-file="$D/munge/munged.seed" \
       --log-file="$D/log/munged.log" --num-threads=4
wait_for 20 "munged socket" bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"

# ---------------------------------------------------------------- 4. MariaDB + slurmdbd (optional)
if [[ $ACCOUNTING == 1 ]]; then
  if [[ ! -d $D/mysql/data/mysql ]]; then
    log "initialising MariaDB datadir"
    # --no-defaults: ignore /etc/mysql/*, everything is given on the command line
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed, see $D/log/mariadb-install.log"
  fi
  log "starting mariadbd on 127.0.0.1:$MYSQL_PORT"
  # mariadbd does not daemonize itself: detach it with setsid, it writes its own pid file
  setsid mariadbd --no-defaults --user=root --datadir="$D/mysql/data" \
    --socket="$D/run/mysqld.sock" --pid-file="$D/run/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$MYSQL_PORT" --log-error="$D/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 "mariadbd" mariadb-admin --no-defaults --socket="$D/run/mysqld.sock" -uroot ping
  mariadb --no-defaults --socket="$D/run/mysqld.sock" -uroot <<SQL
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL

  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it must be mode 600
  cat >"$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# IMPORTANT: connections to slurmdbd take their MUNGE socket from AccountingStoragePass,
# not from AuthInfo -- without this line sacct/slurmctld try /run/munge/munge.socket.2
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---------------------------------------------------------------- 5. slurm.conf
if [[ $CGROUP == 1 ]]; then
  echo "$HOST" >"$D/run/cgroup-mode"   # tells the stop script to rmdir the slurm_<host> cgroups
  TRACK_CONF="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity"
  cat >"$D/etc/cgroup.conf" <<EOF
CgroupPlugin=autodetect
ConstrainCores=yes
ConstrainRAMSpace=no
EOF
else
  # no cgroups: works in unprivileged containers. linuxproc tracks job processes via
  # /proc parentage (a daemonizing child can escape, irrelevant for CI jobs).
  TRACK_CONF="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
fi

cat >"$D/etc/slurm.conf" <<EOF
# generated by scripts/slurm-local-start.sh -- single-node CI cluster
ClusterName=localci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munge socket; cred_expire (default 120 s) is also the delay before a requeued
# job may start again -> 10 s makes submitit checkpoint/requeue tests fast
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$TRACK_CONF
SelectType=select/cons_tres
# CR_Core: memory is not a consumable resource, so jobs without --mem do not grab
# the whole node's memory and several 1-CPU jobs run side by side
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# CI: look at pending jobs every 2 s instead of 60 s/30 s
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
$ACCT_CONF
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
# Real preemption for tests: a job in "urgent" (higher PriorityTier) preempts jobs in
# "debug"; the victim is requeued, gets its --signal (submitit: USR2) at preemption time
# thanks to preempt_send_user_signal, and has GraceTime seconds to checkpoint.
# Jobs that only use "debug" never see any of this.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
export SLURM_CONF=$D/etc/slurm.conf
echo "export SLURM_CONF=$SLURM_CONF" >"$D/env.sh"

if [[ $LINK_ETC == 1 ]]; then
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
    echo /etc/slurm/slurm.conf >"$D/run/etc-link"   # stop script removes exactly this link
  fi
fi

# ---------------------------------------------------------------- 6. slurmdbd, slurmctld, slurmd
if [[ $ACCOUNTING == 1 ]]; then
  log "starting slurmdbd"
  slurmdbd                                   # daemonizes, writes $D/run/slurmdbd.pid
  wait_for 30 "slurmdbd port $DBD_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
fi
log "starting slurmctld"
# -i: ignore unreadable state files (only matters with KEEP_STATE=1)
slurmctld -i                                 # daemonizes, writes $D/run/slurmctld.pid
wait_for 30 "slurmctld" scontrol ping
log "starting slurmd (node $HOST)"
slurmd                                       # daemonizes, writes $D/run/slurmd.pid
wait_for 60 "node $HOST up" bash -c "sinfo -h -n '$HOST' -o %t | grep -qxE 'idle|mix|alloc'"
if [[ $ACCOUNTING == 1 ]]; then
  # slurmctld registers the cluster in slurmdbd by itself on first contact
  wait_for 30 "cluster registered in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx localci"
fi

log "cluster up: $(sinfo -h -o '%P/%a/%t/%N' | tr '\n' ' ')"
log "use:  source $D/env.sh   (or export SLURM_CONF=$SLURM_CONF)"
