#!/usr/bin/env bash
# A private etcd and containerd for development and tests, under one directory.
#
#   hack/dev-env.sh up      install what is missing, start both (idempotent), print the env
#   hack/dev-env.sh env     print the env (source it: eval "$(hack/dev-env.sh env)")
#   hack/dev-env.sh status  show what runs
#   hack/dev-env.sh down    remove every container, stop both; --purge also deletes the directory
#
# The directory is $OLLAMA_FLEET_DEV_DIR (default /tmp/ollama-fleet-dev). containerd gets its own
# config, root, state and socket there; etcd listens on a free loopback port. The system
# containerd socket (/run/containerd/containerd.sock) is never used.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-dev}
CD_DIR=$DIR/containerd
SOCK=$CD_DIR/containerd.sock
ETCD_DIR=$DIR/etcd

log() { echo "dev-env: $*" >&2; }
die() { echo "dev-env: error: $*" >&2; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

etcd_port() {
  if [[ -f $ETCD_DIR/port ]]; then cat "$ETCD_DIR/port"; return; fi
  local p=23790
  while ! port_free "$p" || ! port_free "$((p + 1))"; do p=$((p + 2)); done
  echo "$p" >"$ETCD_DIR/port"
  echo "$p"
}

# wait_for SECONDS WHAT COMMAND...: polls until the command succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up within ${secs}s (see logs in $DIR)"
    sleep 0.1
  done
}

start_containerd() {
  mkdir -p "$CD_DIR/root" "$CD_DIR/state" "$CD_DIR/opt"
  if alive "$CD_DIR/pid" && ctr --address "$SOCK" version >/dev/null 2>&1; then return; fi
  cat >"$CD_DIR/config.toml" <<TOML
version = 2
root = "$CD_DIR/root"
state = "$CD_DIR/state"
# No CRI: this containerd serves ollama-fleet (and ctr) only.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = "$CD_DIR/debug.sock"
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CD_DIR/opt"
TOML
  log "starting containerd (socket $SOCK)"
  rm -f "$SOCK" "$SOCK.ttrpc"
  setsid containerd --config "$CD_DIR/config.toml" >>"$CD_DIR/containerd.log" 2>&1 </dev/null 9>&- &
  echo $! >"$CD_DIR/pid"
  wait_for 30 containerd ctr --address "$SOCK" version
}

start_etcd() {
  mkdir -p "$ETCD_DIR"
  local port; port=$(etcd_port)
  if alive "$ETCD_DIR/pid" && ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$port" endpoint health >/dev/null 2>&1; then return; fi
  log "starting etcd on 127.0.0.1:$port"
  local peer="http://127.0.0.1:$((port + 1))"
  # The flags ARCHITECTURE.md ("etcd sizing") recommends; tests use the same
  # (tests/harness/etcd.rs, RECOMMENDED_FLAGS).
  setsid etcd --name dev --data-dir "$ETCD_DIR/data" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" --initial-cluster "dev=$peer" \
    --auto-compaction-mode periodic --auto-compaction-retention 5m \
    --quota-backend-bytes 8589934592 --snapshot-count 10000 \
    --logger zap --log-level warn >>"$ETCD_DIR/etcd.log" 2>&1 </dev/null 9>&- &
  echo $! >"$ETCD_DIR/pid"
  wait_for 30 etcd env ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$port" endpoint health
}

write_env() {
  local port; port=$(cat "$ETCD_DIR/port")
  cat >"$DIR/env" <<ENV
export OLLAMA_FLEET_DEV_DIR=$DIR
export OLLAMA_FLEET_ETCD_ENDPOINTS=http://127.0.0.1:$port
export OLLAMA_FLEET_CONTAINERD_SOCKET=$SOCK
export CONTAINERD_ADDRESS=$SOCK
export ETCDCTL_API=3
export ETCDCTL_ENDPOINTS=http://127.0.0.1:$port
ENV
}

cmd_up() {
  "$HERE/install-deps.sh"
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock 9
  start_containerd
  start_etcd
  write_env
  cat "$DIR/env"
}

cmd_env() {
  [[ -f $DIR/env ]] || die "nothing is set up in $DIR; run: hack/dev-env.sh up"
  cat "$DIR/env"
}

cmd_status() {
  local ok=0
  if alive "$CD_DIR/pid"; then echo "containerd: running, pid $(cat "$CD_DIR/pid"), socket $SOCK"; else echo "containerd: stopped"; ok=1; fi
  if alive "$ETCD_DIR/pid"; then echo "etcd: running, pid $(cat "$ETCD_DIR/pid"), http://127.0.0.1:$(cat "$ETCD_DIR/port")"; else echo "etcd: stopped"; ok=1; fi
  if alive "$CD_DIR/pid"; then
    for ns in $(ctr --address "$SOCK" namespaces ls -q 2>/dev/null); do
      echo "namespace $ns: $(ctr --address "$SOCK" -n "$ns" containers ls -q | wc -l) containers, $(ctr --address "$SOCK" -n "$ns" tasks ls -q | wc -l) tasks"
    done
  fi
  return $ok
}

# Removes every task, container, image and namespace in our containerd.
clean_containerd() {
  local c="ctr --address $SOCK"
  for ns in $($c namespaces ls -q 2>/dev/null); do
    for t in $($c -n "$ns" tasks ls -q 2>/dev/null); do $c -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    for t in $($c -n "$ns" tasks ls -q 2>/dev/null); do
      for _ in $(seq 50); do $c -n "$ns" tasks rm -f "$t" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    for id in $($c -n "$ns" containers ls -q 2>/dev/null); do $c -n "$ns" containers rm "$id" >/dev/null 2>&1 || true; done
    for i in $($c -n "$ns" images ls -q 2>/dev/null); do $c -n "$ns" images rm "$i" >/dev/null 2>&1 || true; done
    $c namespaces rm "$ns" >/dev/null 2>&1 || true
  done
}

stop_pid() {
  local file=$1 name=$2
  alive "$file" || return 0
  local pid; pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  log "stopped $name"
}

# Kills what is left in the cgroups of our namespaces' instances (agents put them under
# /ollama-fleet/NAMESPACE): a container's processes outlive a SIGKILLed shim.
kill_leftovers() {
  local ns f
  for ns in "$@"; do
    for f in $(find /sys/fs/cgroup -path "*/ollama-fleet/$ns/*" -name cgroup.procs 2>/dev/null); do
      xargs -r kill -9 <"$f" 2>/dev/null || true
    done
  done
}

cmd_down() {
  [[ -d $DIR ]] || { log "nothing in $DIR"; return; }
  stop_pid "$DIR/agent/pid" "ollama-fleet agent"
  # Any other agent on our containerd (a test's or a benchmark's that outlived it) would start
  # again what the cleanup removes.
  pkill -9 -f -- "--containerd-socket $SOCK( |$)" 2>/dev/null || true
  local namespaces
  namespaces=$(pgrep -af "containerd-shim-runc-v2 .*-address $SOCK( |$)" | grep -o -- '-namespace [^ ]*' | cut -d' ' -f2 | sort -u || true)
  if alive "$CD_DIR/pid"; then
    namespaces="$namespaces $(ctr --address "$SOCK" namespaces ls -q 2>/dev/null || true)"
    clean_containerd
  fi
  stop_pid "$CD_DIR/pid" containerd
  stop_pid "$ETCD_DIR/pid" etcd
  # Shims of our containerd that outlived it, and their containers' processes.
  pkill -9 -f "containerd-shim-runc-v2 .*-address $SOCK( |$)" 2>/dev/null || true
  # shellcheck disable=SC2086
  kill_leftovers $namespaces
  # Mounts left under our directory (snapshots of killed tasks), deepest first.
  { grep -F " $DIR/" /proc/mounts || true; } | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [[ ${1:-} == --purge ]]; then rm -rf "$DIR"; log "removed $DIR"; fi
}

case ${1:-} in
  up) cmd_up ;;
  env) cmd_env ;;
  status) cmd_status ;;
  down) shift; cmd_down "$@" ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
