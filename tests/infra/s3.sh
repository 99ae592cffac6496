#!/usr/bin/env bash
# tests/infra/s3.sh -- fljob's throw-away S3 server on 127.0.0.1: OpenStack Swift (Debian 12)
# with its S3 API (the s3api middleware), tempauth and one replica on local disk.
#
# A real server, unlike moto: SigV4 signatures are checked, multipart uploads go through
# Swift's SLO, and data persists across restarts. memcached + proxy + account/container/
# object servers are run by hand in the foreground (no systemd), their PIDs recorded under
# $FLJOB_S3_DIR/pids and stopped by those PIDs only. Nothing is written outside
# $FLJOB_S3_DIR except what `install` puts there through apt (the packaged
# /etc/swift/swift.conf, hash suffix "changeme", is read as is: fine for tests).
#
#   tests/infra/s3.sh install            apt-get install the Debian 12 packages (root)
#   tests/infra/s3.sh start              write the config, start the daemons, wait for /healthcheck
#   eval "$(tests/infra/s3.sh env)"      export the endpoint and the test credentials
#   tests/infra/s3.sh status             exit 0 when every daemon runs, 3 otherwise
#   tests/infra/s3.sh stop               stop each daemon by its PID
#   tests/infra/s3.sh clean              stop, then remove $FLJOB_S3_DIR (all objects)
#   tests/infra/s3.sh stop-one NAME      stop one daemon (proxy|object|container|account|memcached),
#   tests/infra/s3.sh start-one NAME     start it again: fault tests take the server down mid-run
#
# Knobs (environment):
#   FLJOB_S3_DIR              config, data, logs, PIDs         [/tmp/fljob-s3]
#   FLJOB_S3_PORT             proxy = the S3 endpoint          [18480]
#   FLJOB_S3_ACCOUNT_PORT     account server                   [18481]
#   FLJOB_S3_CONTAINER_PORT   container server                 [18482]
#   FLJOB_S3_OBJECT_PORT      object server                    [18483]
#   FLJOB_S3_MEMCACHED_PORT   memcached (tempauth needs it)    [18484]
#   FLJOB_S3_ACCESS_KEY       test access key, ACCOUNT:USER    [test:tester]
#   FLJOB_S3_SECRET_KEY       its secret                       [fljob-s3-test-secret-5e0c7a]
#
# Endpoint http://127.0.0.1:$FLJOB_S3_PORT, path-style addressing, region us-east-1. The
# secret is a distinctive string, not a word, so tests can grep logs and files for it.
set -euo pipefail

D=${FLJOB_S3_DIR:-/tmp/fljob-s3}
PORT=${FLJOB_S3_PORT:-18480}
ACCOUNT_PORT=${FLJOB_S3_ACCOUNT_PORT:-18481}
CONTAINER_PORT=${FLJOB_S3_CONTAINER_PORT:-18482}
OBJECT_PORT=${FLJOB_S3_OBJECT_PORT:-18483}
MC_PORT=${FLJOB_S3_MEMCACHED_PORT:-18484}
PIDS=$D/pids
REGION=us-east-1
ACCESS_KEY=${FLJOB_S3_ACCESS_KEY:-test:tester}
SECRET_KEY=${FLJOB_S3_SECRET_KEY:-fljob-s3-test-secret-5e0c7a}
# Start order; stop goes the other way (the proxy first, so no request is half served).
DAEMONS="memcached account container object proxy"
PACKAGES="swift swift-proxy swift-account swift-container swift-object memcached curl iproute2"

log() { echo "[fljob-s3] $*" >&2; }

install_packages() {
  local guard=""
  # Debian starts memcached on install unless policy-rc.d says no; we run our own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES || {
    rc=$?; [ -n "$guard" ] && rm -f "$guard"; return $rc; }
  [ -n "$guard" ] && rm -f "$guard"
  return 0
}

port_in_use() {
  if command -v ss >/dev/null; then
    ss -Htln "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

port_of() {
  case $1 in
    proxy) echo "$PORT" ;; account) echo "$ACCOUNT_PORT" ;; container) echo "$CONTAINER_PORT" ;;
    object) echo "$OBJECT_PORT" ;; memcached) echo "$MC_PORT" ;;
    *) log "unknown daemon '$1' (one of: $DAEMONS)"; exit 2 ;;
  esac
}

write_storage_config() {  # write_storage_config account|container|object
  local n=$1 port
  port=$(port_of "$n")
  cat > "$D/etc/$n-server.conf" <<EOF
# Written by fljob tests/infra/s3.sh; regenerated on every start.
[DEFAULT]
devices = $D/node
mount_check = false
disable_fallocate = true
bind_ip = 127.0.0.1
bind_port = $port
workers = 1
user = root
swift_dir = $D/etc
log_level = WARNING
[pipeline:main]
pipeline = $n-server
[app:$n-server]
use = egg:swift#$n
[$n-replicator]
[$n-updater]
[$n-auditor]
EOF
  # The ring maps partitions to our one device; it is built once and names the port, so a
  # start with other ports rebuilds it (the data stays: one device, one replica).
  if [ ! -f "$D/etc/$n.ring.gz" ] || [ "$(cat "$D/etc/$n.ring.port" 2>/dev/null)" != "$port" ]; then
    rm -f "$D/etc/$n.builder" "$D/etc/$n.ring.gz"
    swift-ring-builder "$D/etc/$n.builder" create 8 1 1 >/dev/null   # 2^8 partitions, 1 replica
    swift-ring-builder "$D/etc/$n.builder" add "r1z1-127.0.0.1:$port/d1" 100 >/dev/null
    swift-ring-builder "$D/etc/$n.builder" rebalance >/dev/null || true  # exit 1 = "nothing moved"
    echo "$port" > "$D/etc/$n.ring.port"
  fi
}

write_config() {
  mkdir -p "$D"/{etc,node/d1,log} "$PIDS"
  local n
  for n in account container object; do write_storage_config "$n"; done
  cat > "$D/etc/proxy-server.conf" <<EOF
# Written by fljob tests/infra/s3.sh; regenerated on every start.
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $PORT
workers = 1
user = root
swift_dir = $D/etc
log_level = WARNING
[pipeline:main]
# s3api before tempauth (it turns the S3 signature into a tempauth identity); cache because
# tempauth keeps its tokens in memcached; slo because S3 multipart uploads are SLOs.
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
[filter:s3api]
use = egg:swift#s3api
location = $REGION
[filter:tempauth]
use = egg:swift#tempauth
user_${ACCESS_KEY/:/_} = $SECRET_KEY .admin
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MC_PORT
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
EOF
}

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

start_one() {  # start_one NAME: run the daemon in the background, record its PID
  local n=$1
  if alive "$n"; then log "$n is already running (pid $(cat "$PIDS/$n.pid"))"; return 0; fi
  if port_in_use "$(port_of "$n")"; then
    log "port $(port_of "$n") ($n) is in use: choose others with FLJOB_S3_*PORT"; return 1
  fi
  if [ "$n" = memcached ]; then
    memcached -l 127.0.0.1 -p "$MC_PORT" -U 0 -m 64 -u root > "$D/log/$n.out" 2>&1 &
  else
    "swift-$n-server" "$D/etc/$n-server.conf" -v > "$D/log/$n.out" 2>&1 &   # -v: log to stdout
  fi
  echo $! > "$PIDS/$n.pid"
}

healthy() { curl -sf "http://127.0.0.1:$PORT/healthcheck" >/dev/null 2>&1; }

wait_ready() {  # until the proxy answers (and can reach the storage servers), while all live
  local end=$((SECONDS + 60)) n
  until healthy && (exec 3<>"/dev/tcp/127.0.0.1/$OBJECT_PORT") 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$CONTAINER_PORT") 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$ACCOUNT_PORT") 2>/dev/null; do
    for n in $DAEMONS; do
      if ! alive "$n"; then
        log "$n exited; last lines of $D/log/$n.out:"; tail -n 20 "$D/log/$n.out" >&2 || true
        return 1
      fi
    done
    if [ "$SECONDS" -ge "$end" ]; then log "timed out waiting for the S3 endpoint"; return 1; fi
    sleep 0.2
  done
}

start() {
  local missing="" b
  for b in swift-proxy-server swift-account-server swift-container-server swift-object-server \
           swift-ring-builder memcached curl; do
    command -v "$b" >/dev/null || missing="$missing $b"
  done
  if [ -n "$missing" ]; then log "missing:$missing; run '$0 install' as root"; exit 1; fi
  local n
  for n in $DAEMONS; do
    if alive "$n"; then log "$n is already running (pid $(cat "$PIDS/$n.pid")): '$0 stop' first"; exit 1; fi
  done
  for n in $DAEMONS; do
    if port_in_use "$(port_of "$n")"; then
      log "port $(port_of "$n") ($n) is in use: choose others with FLJOB_S3_PORT / FLJOB_S3_ACCOUNT_PORT /" \
          "FLJOB_S3_CONTAINER_PORT / FLJOB_S3_OBJECT_PORT / FLJOB_S3_MEMCACHED_PORT"
      exit 1
    fi
  done
  local t0=$SECONDS
  trap 'log "start failed; stopping what was started"; stop; exit 1' ERR
  write_config
  for n in $DAEMONS; do start_one "$n"; done
  wait_ready
  trap - ERR
  log "S3 endpoint http://127.0.0.1:$PORT up in $((SECONDS - t0)) s (data in $D)"
}

term_one() {  # TERM the recorded PID (Swift's servers end their workers with it)
  local name=$1
  port_of "$name" >/dev/null
  [ -f "$PIDS/$name.pid" ] && kill -TERM "$(cat "$PIDS/$name.pid")" 2>/dev/null || true
}

reap_one() {  # wait for the TERMed PID to exit, KILL after 15 s, forget it
  local name=$1 pid
  [ -f "$PIDS/$name.pid" ] || return 0
  pid=$(cat "$PIDS/$name.pid")
  for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$PIDS/$name.pid"
  log "stopped $name ($pid)"
}

stop_one() { term_one "$1"; reap_one "$1"; }

stop() {  # all at once: each Swift server takes ~2 s to wind down
  local n
  for n in proxy object container account memcached; do term_one "$n"; done
  for n in proxy object container account memcached; do reap_one "$n"; done
}

status() {
  local rc=0 n
  for n in $DAEMONS; do
    if alive "$n"; then echo "$n: running (pid $(cat "$PIDS/$n.pid"), port $(port_of "$n"))"
    else echo "$n: not running"; rc=3; fi
  done
  if [ $rc = 0 ] && ! healthy; then echo "proxy: no answer on http://127.0.0.1:$PORT/healthcheck"; rc=3; fi
  return $rc
}

env_lines() {  # AWS_* for boto3/s3fs/the AWS CLI; S3_ENDPOINT_URL for mosaicml-streaming
  echo "export FLJOB_S3_DIR=$D"
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT"
  echo "export S3_ENDPOINT_URL=http://127.0.0.1:$PORT"
  echo "export AWS_DEFAULT_REGION=$REGION"
  echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
  echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
}

case "${1:-}" in
  install)   install_packages ;;
  start)     start ;;
  stop)      stop ;;
  status)    status ;;
  env)       env_lines ;;
  clean)     stop; rm -rf -- "$D" ;;
  stop-one)  stop_one "${2:?stop-one needs a daemon name: $DAEMONS}" ;;
  start-one) start_one "${2:?start-one needs a daemon name: $DAEMONS}"; wait_ready ;;
  *) echo "usage: $0 {install|start|stop|status|env|clean|stop-one NAME|start-one NAME}" >&2; exit 2 ;;
esac
