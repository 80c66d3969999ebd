#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for hpcdistill's tests and CI (DESIGN.md section 6).
#
#   scripts/local-slurm.sh start    # idempotent: a healthy cluster with the same config is left alone
#   scripts/local-slurm.sh stop     # stops slurmd, slurmctld (and munged if this script started it)
#   scripts/local-slurm.sh status   # daemons, sinfo, squeue
#   scripts/local-slurm.sh restart  # stop + start (job state in the state dir survives)
#
# Runs as root, without systemd: the daemons are started directly and write their logs, pid files
# and state under $HPCDISTILL_SLURM_DIR. Jobs run as the submitting user (root in CI).
#
# Settings (environment):
#   HPCDISTILL_SLURM_DIR             state/spool/log dir            (default /var/tmp/hpcdistill-slurm)
#   HPCDISTILL_SLURM_MAX_ARRAY_SIZE  MaxArraySize                   (default 1001)
#   HPCDISTILL_SLURM_CPUS            CPUs declared for the node     (default max(8, nproc))
#   HPCDISTILL_SLURM_GPUS            fake GPUs (plain files) on it  (default 4)
#   HPCDISTILL_SLURM_TIMEOUT         seconds to wait for the node   (default 60)
# Changing a setting and running `start` again rewrites the config and restarts the daemons.
set -euo pipefail

STATE_DIR=${HPCDISTILL_SLURM_DIR:-/var/tmp/hpcdistill-slurm}
MAX_ARRAY_SIZE=${HPCDISTILL_SLURM_MAX_ARRAY_SIZE:-1001}
NPROC=$(nproc)
# Declare more CPUs than the machine has, so that many light 1-CPU array tasks run at once on a
# 2-core CI machine. slurmd would drain a node with fewer real CPUs than declared;
# SlurmdParameters=config_overrides below tells it to trust slurm.conf instead.
CPUS=${HPCDISTILL_SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
GPUS=${HPCDISTILL_SLURM_GPUS:-4}
TIMEOUT=${HPCDISTILL_SLURM_TIMEOUT:-60}
[[ $CPUS =~ ^[1-9][0-9]*$ && $GPUS =~ ^[0-9]+$ && $MAX_ARRAY_SIZE =~ ^[1-9][0-9]*$ ]] ||
  { echo "local-slurm: HPCDISTILL_SLURM_CPUS, _GPUS and _MAX_ARRAY_SIZE must be integers" >&2; exit 2; }
SLURM_CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_STARTED_MARK=$STATE_DIR/munged.started-here

log() { echo "local-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- munge -------------------------------------------------------------------------------------

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    install -d -o munge -g munge -m 700 /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 400 "$MUNGE_KEY"
  if munge_works; then return 0; fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force 9>&-  # the daemon must not keep our lock
  install -d -m 755 "$STATE_DIR"
  touch "$MUNGE_STARTED_MARK"
  for _ in $(seq 50); do munge_works && return 0; sleep 0.2; done
  tail -n 20 /var/log/munge/munged.log >&2 || true
  die "munged does not answer"
}

# --- config ------------------------------------------------------------------------------------

render_slurm_conf() {
  # RealMemory: 90% of physical memory, so slurmd never finds less than declared.
  local mem_mb
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  cat <<EOF
# Written by scripts/local-slurm.sh; rewritten on every start. Local test cluster, not for production.
ClusterName=hpcdistill-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s); tests requeue.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true

StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: works in containers without systemd or a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none

# CPUs are the consumable resource, memory is not tracked, so --mem never blocks light tasks.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides

# Fast turnover for tests: finished jobs leave squeue within seconds, scheduling runs often.
MinJobAge=5
KillWait=5
InactiveLimit=0
Waittime=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
ReturnToService=2
SlurmdTimeout=60

# submitit requeues preempted or timed-out tasks with scontrol requeue from inside the job.
JobRequeue=1
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=100000

GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

render_gres_conf() {
  # Fake GPUs: plain files. Jobs see SLURM_GPUS_ON_NODE / SLURM_JOB_GPUS, no CUDA_VISIBLE_DEVICES.
  echo "# Written by scripts/local-slurm.sh"
  ((GPUS > 0)) && echo "NodeName=localhost Name=gpu File=$STATE_DIR/fake-gpu/gpu[0-$((GPUS - 1))]"
  return 0
}

# Writes the config files; returns 0 if anything changed.
write_config() {
  local changed=1 new
  install -d -m 755 /etc/slurm "$STATE_DIR" "$STATE_DIR/state" "$STATE_DIR/spool" \
    "$STATE_DIR/log" "$STATE_DIR/fake-gpu"
  for i in $(seq 0 $((GPUS - 1))); do touch "$STATE_DIR/fake-gpu/gpu$i"; done
  new=$(render_slurm_conf)
  if [[ ! -f $SLURM_CONF ]] || [[ $(cat "$SLURM_CONF") != "$new" ]]; then
    printf '%s\n' "$new" >"$SLURM_CONF"; changed=0
  fi
  new=$(render_gres_conf)
  if [[ ! -f $GRES_CONF ]] || [[ $(cat "$GRES_CONF") != "$new" ]]; then
    printf '%s\n' "$new" >"$GRES_CONF"; changed=0
  fi
  return $changed
}

# --- slurm daemons -----------------------------------------------------------------------------

# pid from a pid file if that process is alive and is the named program.
daemon_pid() {
  local name=$1 pidfile=$STATE_DIR/$1.pid pid
  [[ -f $pidfile ]] || return 1
  pid=$(cat "$pidfile")
  [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$name" ]] || return 1
  echo "$pid"
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n 1; }

healthy() {
  daemon_pid slurmctld >/dev/null && daemon_pid slurmd >/dev/null || return 1
  case $(node_state) in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

stop_daemon() {
  local name=$1 pid
  pid=$(daemon_pid "$name") || return 0
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  log "$name did not exit after 10 s; killing"
  kill -9 "$pid" 2>/dev/null || true
}

show_logs() {
  for f in "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log"; do
    echo "---- tail of $f" >&2
    tail -n 25 "$f" >&2 2>/dev/null || echo "(missing)" >&2
  done
}

wait_for_node() {
  local state deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case $state in
      idle | mixed | allocated | completing) log "node localhost is $state"; return 0 ;;
      *down* | *drain* | *fail*)
        # e.g. left DOWN/DRAINED by an earlier run; slurmd is up again, so put it back.
        if daemon_pid slurmd >/dev/null; then
          scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        fi ;;
    esac
    sleep 1
  done
  log "node localhost not ready after ${TIMEOUT}s (state: '${state:-none}')"
  scontrol show node localhost >&2 2>/dev/null || true
  show_logs
  return 1
}

start() {
  [[ $EUID -eq 0 ]] || die "run as root (it writes /etc/slurm and starts the daemons)"
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
  fi
  start_munge
  local config_changed=false
  write_config && config_changed=true
  if $config_changed && daemon_pid slurmctld >/dev/null; then
    log "config changed; restarting the daemons"
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  if ! $config_changed && healthy; then
    log "already running and healthy"
    sinfo
    return 0
  fi
  if ! daemon_pid slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld 9>&- || { show_logs; die "slurmctld failed to start"; }
  fi
  # scontrol answers once slurmctld is listening.
  for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  if ! daemon_pid slurmd >/dev/null; then
    log "starting slurmd"
    slurmd -N localhost 9>&- || { show_logs; die "slurmd failed to start"; }
  fi
  wait_for_node || exit 1
  sinfo
}

stop() {
  stop_daemon slurmd
  stop_daemon slurmctld
  if [[ -f $MUNGE_STARTED_MARK && -f /run/munge/munged.pid ]]; then
    local pid
    pid=$(cat /run/munge/munged.pid)
    if [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == munged ]]; then
      log "stopping munged (pid $pid)"
      kill "$pid" || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$MUNGE_STARTED_MARK"
  fi
}

status() {
  local rc=0 pid
  for d in slurmctld slurmd; do
    if pid=$(daemon_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
  done
  if munge_works; then echo "munged: running"; else echo "munged: not answering"; rc=1; fi
  echo "state dir: $STATE_DIR"
  if ((rc == 0)); then sinfo; squeue; fi
  return $rc
}

# One start/stop at a time: tests and CI steps may call this script concurrently.
lock() {
  install -d -m 755 "$STATE_DIR"
  exec 9>"$STATE_DIR/lock"
  flock -w 120 9 || die "another local-slurm.sh holds $STATE_DIR/lock"
}

case ${1:-} in
  start) lock; start ;;
  stop) lock; stop ;;
  restart) lock; stop; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
