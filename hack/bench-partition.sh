#!/usr/bin/env bash
# The issue-11 benchmark (not a test): a silent partition between the agent and a private etcd
# (iptables DROP for 30 s, twice the lease TTL), ROUNDS times, release builds. Prints, per round:
# crash replacement before and during the partition, how long the CLI took to give up, and how
# long after the heal the node and status keys were back. The environment is hack/test.sh's.
# Usage: hack/bench-partition.sh [ROUNDS]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-bench}
hack/install-deps.sh
trap 'hack/dev-env.sh down --purge' EXIT
eval "$(hack/dev-env.sh up)"
echo "bench: building release binaries" >&2
cargo build --locked --release -p ollama-fleet -p ollama-sim --bin ollama-fleet --bin ollama-sim
export OLLAMA_FLEET_BINARY=$ROOT/target/release/ollama-fleet
export OLLAMA_FLEET_SIM_IMAGE_TAR=$ROOT/target/images-bench/ollama-sim.oci.tar
hack/sim-image.sh --binary "$ROOT/target/release/ollama-sim" --out "$ROOT/target/images-bench" >/dev/null
for round in $(seq "${1:-3}"); do
  echo -n "round $round: "
  cargo test --locked --release -p fleet-e2e --test partition -- --nocapture 2>&1 | grep -E '^partition:|panicked|FAILED' || true
done
