#!/usr/bin/env bash
# The README's "run it" command: a private etcd and containerd, the ollama-sim image, the demo
# fleet (manifests/examples/sim.yaml) applied to etcd, and a node agent converging it.
#
#   hack/quickstart.sh         set everything up and show the fleet converging
#   hack/dev-env.sh down       stop it all (the agent, every instance, containerd, etcd)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-dev}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Starting a private etcd and containerd in $OLLAMA_FLEET_DEV_DIR"
eval "$(hack/dev-env.sh up)"
hack/dev-env.sh status || true

step "Building ollama-fleet and ollama-sim"
cargo build --locked -p ollama-fleet -p ollama-sim   # a few minutes the first time
FLEET=$ROOT/target/debug/ollama-fleet

step "Importing the ollama-sim image into containerd namespace ollama-fleet"
hack/sim-image.sh --binary target/debug/ollama-sim --import --namespace ollama-fleet >/dev/null

step "ollama-fleet validate -f manifests/examples/sim.yaml && ollama-fleet apply -f manifests/examples/sim.yaml"
"$FLEET" validate -f manifests/examples/sim.yaml
"$FLEET" apply -f manifests/examples/sim.yaml

step "Starting the node agent (log: $OLLAMA_FLEET_DEV_DIR/agent/agent.log)"
mkdir -p "$OLLAMA_FLEET_DEV_DIR/agent"
if [[ -f $OLLAMA_FLEET_DEV_DIR/agent/pid ]] && kill -0 "$(cat "$OLLAMA_FLEET_DEV_DIR/agent/pid")" 2>/dev/null; then
  echo "already running (pid $(cat "$OLLAMA_FLEET_DEV_DIR/agent/pid"))"
else
  setsid "$FLEET" agent --node-name "$(hostname)" --label pool=dev \
    --containerd-socket "$OLLAMA_FLEET_CONTAINERD_SOCKET" \
    --state-dir "$OLLAMA_FLEET_DEV_DIR/agent/state" --listen 127.0.0.1:9477 \
    >>"$OLLAMA_FLEET_DEV_DIR/agent/agent.log" 2>&1 </dev/null &
  echo $! >"$OLLAMA_FLEET_DEV_DIR/agent/pid"
fi

step "Watching: ollama-fleet get fleets"
# Done when the agent's own view (/instances) has every instance ready and the aggregated status
# agrees (a status key left by an earlier run expires with its lease; it does not count).
for _ in $(seq 90); do
  out=$("$FLEET" get fleets 2>/dev/null || true)
  echo "$out" | tail -n +2
  inst=$(curl -sf http://127.0.0.1:9477/instances || true)
  ready=$(grep -o '"ready":true' <<<"$inst" | wc -l || true)
  unready=$(grep -o '"ready":false' <<<"$inst" | wc -l || true)
  if [[ $ready -gt 0 && $unready -eq 0 ]] \
    && echo "$out" | awk -v n="$ready" 'NR==2 && $4==$5 && $5==n {ok=1} END {exit !ok}'; then
    break
  fi
  sleep 1
done
"$FLEET" get fleets

step "ollama-fleet get instances"
"$FLEET" get instances

step "curl http://127.0.0.1:9477/instances (what a load balancer reads)"
curl -s http://127.0.0.1:9477/instances; echo
step "curl http://127.0.0.1:21434/api/generate (slot 0; the agent pulled the model once and loaded it)"
curl -s http://127.0.0.1:21434/api/generate -d '{"model":"smollm2:135m","prompt":"hello","options":{"num_predict":4}}' | cut -c1-120

cat <<MSG

The demo fleet runs. Try, in a shell with: eval "\$(hack/dev-env.sh env)"
  target/debug/ollama-fleet get instances -o wide
  target/debug/ollama-fleet describe fleet sim                    # conditions, recent exits
  target/debug/ollama-fleet logs <an instance ID> --state-dir $OLLAMA_FLEET_DEV_DIR/agent/state
  ctr -n ollama-fleet tasks kill -s SIGKILL <an instance ID>      # it is replaced
  etcdctl get --prefix /ollama-fleet/status/                      # per-node status
  sed 's/perNode: 4/perNode: 6/' manifests/examples/sim.yaml | target/debug/ollama-fleet apply -f -
Stop everything (agent, instances, containerd, etcd):
  hack/dev-env.sh down
MSG
