#!/usr/bin/env bash
# The issue-3 benchmark (not a test): release builds, a private etcd and containerd, then
# fleet-bench, which prints
#   - converge time from empty to all ready for N sim instances: the agent vs a baseline that
#     creates and starts the same containers straight through containerd's API (ratio);
#   - crash replacement: kill -> replacement running / ready, p50 and p99;
#   - the agent's peak RSS and idle CPU with N instances.
# Usage: hack/bench.sh [--n 58,116] [--kills 20] [--concurrency 16] [--idle 30] [--baseline 0]
#        hack/bench.sh --n 833 --baseline 0   (see hack/bench-density.sh)
#        hack/bench.sh --scale NODES [--per-node 58]   (see hack/bench-scale.sh)
#        hack/bench.sh --lifecycle N   (see hack/bench-lifecycle.sh)
#        hack/bench.sh --partition ROUNDS   (see hack/bench-partition.sh)
#        hack/bench.sh --serve N [--seconds S]   (see hack/bench-serve.sh)
#        hack/bench.sh --bodies BUDGET_MIB   (see hack/bench-gateway-memory.sh)
#        hack/bench.sh --affinity N [--engine 1]   (see hack/bench-affinity.sh)
#        hack/bench.sh --chaos 1 [--faults F,G]   (see hack/chaos.sh)
#        hack/bench.sh --tenants N [--seconds S]   (see hack/bench-tenants.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-bench}
hack/install-deps.sh
trap 'hack/dev-env.sh down --purge' EXIT
eval "$(hack/dev-env.sh up)"
echo "bench: building release binaries" >&2
cargo build --locked --release -p ollama-fleet -p ollama-sim -p fleet-e2e --bin ollama-fleet --bin ollama-sim --bin fleet-bench
export OLLAMA_FLEET_BINARY=$ROOT/target/release/ollama-fleet
export OLLAMA_FLEET_SIM_IMAGE_TAR=$ROOT/target/images-bench/ollama-sim.oci.tar
hack/sim-image.sh --binary "$ROOT/target/release/ollama-sim" --out "$ROOT/target/images-bench" >/dev/null
if [[ " $* " == *" --engine 1 "* ]]; then
  # The real engine (llama-server and SmolLM2-135M; built once, then cached) behind the sim.
  engine_env=$(hack/llama-engine.sh) || { echo "bench: building the real engine failed (above)" >&2; exit 1; }
  eval "$engine_env"
  export OLLAMA_FLEET_ENGINE_IMAGE_TAR=$ROOT/target/images-bench/ollama-engine.oci.tar
  hack/sim-image.sh --binary "$ROOT/target/release/ollama-sim" --out "$ROOT/target/images-bench" \
    --engine "$LLAMA_SERVER:$LLAMA_GGUF" >/dev/null
fi
echo "bench: $(nproc) cpus, $(free -g | awk '/Mem:/ {print $2}') GiB, containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1 {print $3}')" >&2
if [[ ${1:-} == --partition ]]; then
  # hack/bench-partition.sh: the silent-partition e2e test, ROUNDS times, printing its figures.
  for round in $(seq "${2:-3}"); do
    echo -n "round $round: "
    cargo test --locked --release -p fleet-e2e --test partition -- --nocapture 2>&1 | grep -E '^partition:|panicked|FAILED' || true
  done
  exit 0
fi
"$ROOT/target/release/fleet-bench" "$@"
