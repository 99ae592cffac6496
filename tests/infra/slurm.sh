#!/usr/bin/env bash
# tests/infra/slurm.sh -- fljob's throw-away single-node SLURM cluster on localhost.
#
# munged + private MariaDB + slurmdbd (so `sacct`, and therefore submitit, work) +
# slurmctld + slurmd, all run by hand in the foreground (no systemd, no cgroups), their
# PIDs recorded under $FLJOB_SLURM_DIR/pids and stopped by those PIDs only. Nothing is
# written outside $FLJOB_SLURM_DIR except what `install` puts there through apt.
#
#   tests/infra/slurm.sh install          apt-get install the Debian 12 packages (root)
#   tests/infra/slurm.sh start            write the config, start the daemons, wait until the node is idle
#   source <(tests/infra/slurm.sh env)    export SLURM_CONF (and FLJOB_SLURM_DIR) in this shell
#   tests/infra/slurm.sh status           exit 0 when every daemon runs, 3 otherwise
#   tests/infra/slurm.sh stop             cancel all jobs, stop each daemon by its PID
#   tests/infra/slurm.sh clean            stop, then remove $FLJOB_SLURM_DIR
#
# Knobs (environment):
#   FLJOB_SLURM_DIR          state, config, logs, sockets          [/tmp/fljob-slurm]
#   FLJOB_SLURM_CTLD_PORT    slurmctld                              [16817]
#   FLJOB_SLURM_D_PORT       slurmd                                 [16818]
#   FLJOB_SLURM_DBD_PORT     slurmdbd                               [16819]
#   FLJOB_SLURM_CPUS         CPUs the node advertises               [max(nproc, 4)]
#   FLJOB_SLURM_CRED_EXPIRE  credential lifetime, s; also how long a requeued job waits
#                            before it may start again (SLURM's default is 120)   [5]
#   FLJOB_SLURM_DBD          1: accounting through slurmdbd; 0: none (sacct then exits 1
#                            and submitit cannot see job states)                  [1]
set -euo pipefail

D=${FLJOB_SLURM_DIR:-/tmp/fljob-slurm}
CTLD_PORT=${FLJOB_SLURM_CTLD_PORT:-16817}
SD_PORT=${FLJOB_SLURM_D_PORT:-16818}
DBD_PORT=${FLJOB_SLURM_DBD_PORT:-16819}
NPROC=$(nproc)
CPUS=${FLJOB_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}
CRED_EXPIRE=${FLJOB_SLURM_CRED_EXPIRE:-5}
WITH_DBD=${FLJOB_SLURM_DBD:-1}
NODE=localhost
PIDS=$D/pids
CONF=$D/etc/slurm.conf
DAEMONS="munged mysqld slurmdbd slurmctld slurmd"
# A few MB of accounting: keep MariaDB's redo log and buffer pool small (defaults: 96 MB, 128 MB).
SMALL_DB="--innodb-log-file-size=8M --innodb-buffer-pool-size=32M"

log() { echo "[fljob-slurm] $*" >&2; }

install_packages() {
  local pkgs="slurm-wlm munge" guard=""
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  # Debian starts a server package's service on install unless policy-rc.d says no. We
  # start our own daemons with our own config, so keep the packaged ones down.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkgs iproute2 || {
    rc=$?; [ -n "$guard" ] && rm -f "$guard"; return $rc; }
  [ -n "$guard" ] && rm -f "$guard"
  return 0
}

mem_mb() { awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo; }

port_in_use() {
  if command -v ss >/dev/null; then
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

write_config() {
  mkdir -p "$D"/{etc,state,spool,log,munge,mysql} "$PIDS"
  chmod 755 "$D" "$D/munge"   # munged refuses a socket directory others cannot reach
  if [ ! -s "$D/munge/munge.key" ]; then   # a private key; /etc/munge is left alone
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$D/munge/munge.key"
  fi
  local acct="AccountingStorageType=accounting_storage/none"
  if [ "$WITH_DBD" = 1 ]; then
    # The munge socket for slurmdbd connections is AccountingStoragePass, not AuthInfo.
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$D/munge/munge.socket
JobAcctGatherFrequency=5"
  fi
  local overrides=""
  [ "$CPUS" -gt "$NPROC" ] && overrides="SlurmdParameters=config_overrides"
  cat > "$CONF" <<EOF
# Written by fljob tests/infra/slurm.sh; regenerated on every start.
ClusterName=fljob
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged socket; cred_expire is also the delay before a requeued job may start.
AuthInfo=socket=$D/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/state/slurmctld.pidfile
SlurmdPidFile=$D/spool/slurmd.pidfile
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule every second (defaults 60 s / 30 s): pending and requeued jobs start at once.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# 'scontrol requeue' (the fljob trailer) needs it.
JobRequeue=1
$overrides
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$(mem_mb) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ "$WITH_DBD" = 1 ]; then
    # slurmdbd reads slurmdbd.conf beside $SLURM_CONF, and only if it is mode 600.
    cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/state/slurmdbd.pidfile
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=0
StorageLoc=fljob_acct_db
StorageUser=root
EOF
    chmod 600 "$D/etc/slurmdbd.conf"
  fi
}

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

bg_start() {  # bg_start NAME CMD...: run CMD in the background, record its PID
  local name=$1; shift
  "$@" > "$D/log/$name.out" 2>&1 &
  echo $! > "$PIDS/$name.pid"
}

wait_for() {  # wait_for SECONDS NAME CHECK...: until CHECK succeeds, while NAME is alive
  local end=$((SECONDS + $1)) name=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      log "$name exited; last lines of $D/log/$name.out:"; tail -n 20 "$D/log/$name.out" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$end" ]; then log "timed out waiting for $name"; return 1; fi
    sleep 0.2
  done
}

start() {
  local missing=""
  for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null || missing="$missing $b"; done
  if [ "$WITH_DBD" = 1 ]; then
    for b in slurmdbd mariadbd mariadb-install-db; do command -v "$b" >/dev/null || missing="$missing $b"; done
  fi
  if [ -n "$missing" ]; then log "missing:$missing; run '$0 install' as root"; exit 1; fi
  local n
  for n in $DAEMONS; do
    if alive "$n"; then log "$n is already running (pid $(cat "$PIDS/$n.pid")): '$0 stop' first"; exit 1; fi
  done
  local p
  for p in "$CTLD_PORT" "$SD_PORT" $([ "$WITH_DBD" = 1 ] && echo "$DBD_PORT"); do
    if port_in_use "$p"; then
      log "port $p is in use: choose others with FLJOB_SLURM_CTLD_PORT / FLJOB_SLURM_D_PORT / FLJOB_SLURM_DBD_PORT"
      exit 1
    fi
  done
  local t0=$SECONDS
  trap 'log "start failed; stopping what was started"; stop; exit 1' ERR
  write_config
  export SLURM_CONF=$CONF

  bg_start munged /usr/sbin/munged -F --force \
    --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  wait_for 20 munged sh -c "munge -S '$D/munge/munge.socket' -n | unmunge -S '$D/munge/munge.socket'"

  if [ "$WITH_DBD" = 1 ]; then
    if [ ! -d "$D/mysql/data/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$D/mysql/data" --user=root $SMALL_DB \
        --auth-root-authentication-method=normal --skip-test-db > "$D/log/mysql-install.log" 2>&1
    fi
    bg_start mysqld mariadbd --no-defaults --user=root --datadir="$D/mysql/data" $SMALL_DB \
      --socket="$D/mysql/mysql.sock" --skip-networking --pid-file="$D/mysql/mysqld.pid" \
      --log-error="$D/log/mysqld.err"
    wait_for 60 mysqld mariadb --no-defaults -S "$D/mysql/mysql.sock" -uroot -e 'select 1'
    # StorageHost=localhost means "the unix socket": its path comes from MYSQL_UNIX_PORT.
    bg_start slurmdbd env MYSQL_UNIX_PORT="$D/mysql/mysql.sock" SLURM_CONF="$CONF" slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -i show cluster
    sacctmgr -i add cluster fljob >/dev/null 2>&1 || true
  fi

  bg_start slurmctld slurmctld -D -i -f "$CONF"
  wait_for 30 slurmctld scontrol ping
  bg_start slurmd slurmd -D -N "$NODE" -f "$CONF"
  wait_for 60 slurmd sh -c "sinfo -h -N -n $NODE -o %t | grep -qE '^(idle|mix|alloc)'"
  trap - ERR
  log "cluster up in $((SECONDS - t0)) s (ports ctld $CTLD_PORT, slurmd $SD_PORT, dbd $DBD_PORT); export SLURM_CONF=$CONF"
}

stop_one() {  # TERM the recorded PID, KILL after 15 s
  local name=$1 pid
  [ -f "$PIDS/$name.pid" ] || return 0
  pid=$(cat "$PIDS/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $name ($pid)"
  fi
  rm -f "$PIDS/$name.pid"
}

stop() {
  export SLURM_CONF=$CONF
  if alive slurmctld && [ -f "$CONF" ]; then
    # Every job of this cluster (it is ours alone): slurmd then ends their steps.
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --full --quiet 2>/dev/null || true
      sleep 1
    fi
  fi
  stop_one slurmd
  stop_one slurmctld
  stop_one slurmdbd
  stop_one mysqld
  stop_one munged
}

status() {
  export SLURM_CONF=$CONF
  local rc=0 n
  for n in $DAEMONS; do
    if [ "$n" = mysqld ] || [ "$n" = slurmdbd ]; then [ "$WITH_DBD" = 1 ] || continue; fi
    if alive "$n"; then echo "$n: running (pid $(cat "$PIDS/$n.pid"))"; else echo "$n: not running"; rc=3; fi
  done
  if alive slurmctld; then sinfo; squeue; fi
  return $rc
}

case "${1:-}" in
  install) install_packages ;;
  start)   start ;;
  stop)    stop ;;
  status)  status ;;
  env)     echo "export SLURM_CONF=$CONF"; echo "export FLJOB_SLURM_DIR=$D" ;;
  clean)   stop; rm -rf -- "$D" ;;
  *) echo "usage: $0 {install|start|stop|status|env|clean}" >&2; exit 2 ;;
esac
