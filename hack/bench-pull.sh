#!/usr/bin/env bash
# The issue-4 benchmark (not a test): pull and unpack a ~100 MB image (4 layers, 5000 files)
# from a local registry with the agent's puller and with `ctr images pull --plain-http`, each
# into a fresh namespace, three rounds; prints both times and the ratio.
# Usage: hack/bench-pull.sh [--rounds 3]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-bench}
hack/install-deps.sh
trap 'hack/dev-env.sh down --purge' EXIT
eval "$(hack/dev-env.sh up)"
cargo build --locked --release -p fleet-e2e --bin fleet-bench
ARCHIVE=$(hack/make-test-image.sh --layers 4 --files 1250 --size 20 --out "$ROOT/target/images-big")
echo "bench: $(du -h "$ARCHIVE" | cut -f1) image, $(nproc) cpus, containerd $(containerd --version | awk '{print $3}')" >&2
"$ROOT/target/release/fleet-bench" --pull-archive "$ARCHIVE" "$@"
