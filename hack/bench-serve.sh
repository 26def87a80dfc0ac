#!/usr/bin/env bash
# The node gateway benchmark (issue 14; not a test): N single-slot sim instances (default 16)
# behind nginx round robin, HAProxy leastconn + maxconn 1, and the agent's gateway, all in one
# run on the same instances. Prints one table: open-loop Poisson load at 50/80/95% of capacity
# with skewed output lengths, TTFT and end-to-end p50/p99 and failed requests per setup; the
# gateway's added latency at low load; failed requests while every instance is replaced under
# 80% load.
# Usage: hack/bench-serve.sh [N] [SECONDS_PER_POINT]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --serve "${1:-16}" --seconds "${2:-20}"
