#!/usr/bin/env bash
# Fuzzes the manifest parser and validator (not a test; the test suite runs a short slice):
# N mutated manifests (default 1,000,000) from the examples, in a release build; prints the
# crash-free run length, or the first input that breaks a property (panic, a valid fleet that
# does not survive its own round trip, an unbounded error).
# Usage: hack/fuzz.sh [N] [SEED]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
hack/install-deps.sh
FLEET_FUZZ_ITERATIONS=${1:-1000000} FLEET_FUZZ_SEED=${2:-$RANDOM} \
  cargo test --locked --release -p fleet-api --test fuzz -- --nocapture 2>&1 | grep -E '^fuzz:|panicked|breaks|^test result' 
