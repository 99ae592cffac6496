#!/usr/bin/env bash
# tests/infra/prometheus.sh -- a throw-away Prometheus + Pushgateway on localhost for fljob's tests.
#
# Prometheus scrapes (every FLJOB_PROM_SCRAPE_INTERVAL) the file_sd targets that fljob runs
# write into $FLJOB_PROM_TARGETS and the Pushgateway, with fljob's alert rules loaded. Both
# run in the background, their PIDs recorded under $FLJOB_PROM_DIR/pids and stopped by
# those PIDs only. Nothing is written outside $FLJOB_PROM_DIR (and the targets folder).
#
#   tests/infra/prometheus.sh install     apt-get install the Debian packages (root)
#   tests/infra/prometheus.sh start       write the config, start both, wait until they answer
#   source <(tests/infra/prometheus.sh env)   export FLJOB_PROM_URL, FLJOB_PUSHGATEWAY_URL, ...
#   tests/infra/prometheus.sh status      exit 0 when both run, 3 otherwise
#   tests/infra/prometheus.sh stop        stop both by PID
#   tests/infra/prometheus.sh clean       stop, then remove $FLJOB_PROM_DIR
#
# Knobs (environment):
#   FLJOB_PROM_DIR              config, TSDB, logs, pids                    [/tmp/fljob-prometheus]
#   FLJOB_PROM_PORT             Prometheus HTTP port                        [19190]
#   FLJOB_PUSHGATEWAY_PORT      Pushgateway HTTP port                       [19191]
#   FLJOB_PROM_TARGETS          file_sd folder (spec metrics.file_sd_dir)   [$FLJOB_PROM_DIR/targets]
#   FLJOB_PROM_SCRAPE_INTERVAL  scrape and rule evaluation interval         [1s]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
D=${FLJOB_PROM_DIR:-/tmp/fljob-prometheus}
PROM_PORT=${FLJOB_PROM_PORT:-19190}
PGW_PORT=${FLJOB_PUSHGATEWAY_PORT:-19191}
TARGETS=${FLJOB_PROM_TARGETS:-$D/targets}
INTERVAL=${FLJOB_PROM_SCRAPE_INTERVAL:-1s}
PIDS=$D/pids

log() { echo "[fljob-prometheus] $*" >&2; }

find_bin() {  # Debian names the Pushgateway prometheus-pushgateway
  local b
  for b in "$@"; do command -v "$b" 2>/dev/null && return 0; done
  return 1
}

write_config() {
  mkdir -p "$D/data" "$D/log" "$PIDS" "$TARGETS"
  cp "$REPO/configs/prometheus/alerts.yml" "$D/alerts.yml"
  cat > "$D/prometheus.yml" <<CONF
global:
  scrape_interval: $INTERVAL
  evaluation_interval: $INTERVAL
rule_files: [alerts.yml]
scrape_configs:
  - job_name: fljob-file-sd
    honor_labels: true
    file_sd_configs:
      - files: ['$TARGETS/*.json']
        refresh_interval: 5s
  - job_name: fljob-pushgateway
    honor_labels: true
    static_configs:
      - targets: ['127.0.0.1:$PGW_PORT']
CONF
}

running() { [ -s "$PIDS/$1" ] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }

wait_http() {  # name url
  local i
  for i in $(seq 1 100); do
    if curl -fs -o /dev/null "$2"; then return 0; fi
    running "$1" || { log "$1 exited; its log:"; tail -20 "$D/log/$1.log" >&2; return 1; }
    sleep 0.2
  done
  log "$1 did not answer $2 in 20 s"; return 1
}

start() {
  local prom pgw
  prom=$(find_bin prometheus) || { log "prometheus missing: Debian package prometheus"; exit 4; }
  pgw=$(find_bin prometheus-pushgateway pushgateway) || {
    log "pushgateway missing: Debian package prometheus-pushgateway"; exit 4; }
  write_config
  "$(find_bin promtool)" check config "$D/prometheus.yml" >/dev/null
  if ! running pushgateway; then
    "$pgw" --web.listen-address="127.0.0.1:$PGW_PORT" --web.enable-admin-api \
      >"$D/log/pushgateway.log" 2>&1 &
    echo $! > "$PIDS/pushgateway"
  fi
  if ! running prometheus; then
    "$prom" --config.file="$D/prometheus.yml" --storage.tsdb.path="$D/data" \
      --web.listen-address="127.0.0.1:$PROM_PORT" --web.enable-lifecycle \
      >"$D/log/prometheus.log" 2>&1 &
    echo $! > "$PIDS/prometheus"
  fi
  wait_http pushgateway "http://127.0.0.1:$PGW_PORT/-/ready"
  wait_http prometheus "http://127.0.0.1:$PROM_PORT/-/ready"
  log "Prometheus http://127.0.0.1:$PROM_PORT, Pushgateway http://127.0.0.1:$PGW_PORT, targets in $TARGETS"
}

stop_one() {
  local pid i
  running "$1" || { rm -f "$PIDS/$1"; return 0; }
  pid=$(cat "$PIDS/$1")
  kill "$pid"
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$PIDS/$1"
}

case "${1:-}" in
  install) DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus prometheus-pushgateway curl ;;
  start) start ;;
  env)
    echo "export FLJOB_PROM_DIR=$D"
    echo "export FLJOB_PROM_URL=http://127.0.0.1:$PROM_PORT"
    echo "export FLJOB_PUSHGATEWAY_URL=http://127.0.0.1:$PGW_PORT"
    echo "export FLJOB_PROM_TARGETS=$TARGETS" ;;
  status) running prometheus && running pushgateway || exit 3 ;;
  stop) stop_one prometheus; stop_one pushgateway ;;
  clean) stop_one prometheus; stop_one pushgateway; rm -rf "$D" ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
