#!/usr/bin/env bash
# The README's "run it" command: a private etcd and containerd, the ollama-sim image, and the
# demo fleet (manifests/examples/sim.yaml).
#
# Today (before the node agent lands) it validates the demo fleet and runs one instance of it
# straight through containerd, then asks it for a streamed answer. Stop everything with:
#   hack/dev-env.sh down
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-dev}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Starting a private etcd and containerd in $OLLAMA_FLEET_DEV_DIR"
eval "$(hack/dev-env.sh up)"
hack/dev-env.sh status

step "Building ollama-fleet and ollama-sim"
cargo build --locked --quiet -p ollama-fleet -p ollama-sim
FLEET=$ROOT/target/debug/ollama-fleet

step "Importing the ollama-sim image into containerd namespace ollama-fleet"
hack/sim-image.sh --binary target/debug/ollama-sim --import --namespace ollama-fleet

step "Validating the demo fleet: ollama-fleet validate -f manifests/examples/sim.yaml"
"$FLEET" validate -v -f manifests/examples/sim.yaml

step "Running slot 0 of the demo fleet through containerd (0.25 cpu, 128Mi, port 21434)"
ID=sim-0-quick
ctr -n ollama-fleet tasks kill -s SIGKILL "$ID" >/dev/null 2>&1 || true
ctr -n ollama-fleet tasks rm -f "$ID" >/dev/null 2>&1 || true
ctr -n ollama-fleet containers rm "$ID" >/dev/null 2>&1 || true
mkdir -p "$OLLAMA_FLEET_DEV_DIR/models"
ctr -n ollama-fleet run -d --net-host --memory-limit $((128 << 20)) --cpus 0.25 \
  --label ollama-fleet.io/fleet=sim --label ollama-fleet.io/slot=0 --label ollama-fleet.io/port=21434 \
  --env OLLAMA_HOST=127.0.0.1:21434 --env OLLAMA_MODELS=/models --env OLLAMA_NOPRUNE=1 \
  --env OLLAMA_KEEP_ALIVE=-1 --env SIM_MODEL_SIZE=32Mi --env SIM_LOAD_TIME=300ms \
  --mount "type=bind,src=$OLLAMA_FLEET_DEV_DIR/models,dst=/models,options=rbind:rw" \
  localhost/ollama-sim:dev "$ID" >/dev/null
for _ in $(seq 100); do curl -sf http://127.0.0.1:21434/api/version >/dev/null && break; sleep 0.1; done
ctr -n ollama-fleet tasks ls

step "curl http://127.0.0.1:21434/api/pull (model smollm2:135m)"
curl -sf http://127.0.0.1:21434/api/pull -d '{"model":"smollm2:135m","stream":false}'; echo
step "curl http://127.0.0.1:21434/api/generate (streamed)"
curl -sf http://127.0.0.1:21434/api/generate -d '{"model":"smollm2:135m","prompt":"hello","options":{"num_predict":6}}' | cut -c1-150

cat <<MSG

The demo instance is running. Try:
  eval "\$(hack/dev-env.sh env)"; ctr -n ollama-fleet tasks ls
  curl -s http://127.0.0.1:21434/api/ps
Stop everything (containers, containerd, etcd):
  hack/dev-env.sh down
MSG
