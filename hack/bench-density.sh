#!/usr/bin/env bash
# One node at the target density (issue 15; not a test): N sim instances (default 833) under one
# agent on the real containerd + runc. Prints the converge time from empty to all ready, the
# agent's RSS and idle CPU with N instances, and crash replacement (kill -> replacement running
# / ready) at that density. No baseline (hack/bench.sh --n N has one).
# Usage: hack/bench-density.sh [N] [IDLE_SECONDS(60)] [KILLS(20)]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --n "${1:-833}" --baseline 0 --idle "${2:-60}" --kills "${3:-20}"
