#!/usr/bin/env bash
# The tenants benchmark (issue 25; not a test): N single-slot sim instances (default 8) behind
# the gateway, three interactive tenants at 20% of capacity each, and a batch tenant flooding at
# 3x its share (75% of capacity). Three runs on one schedule: no flood; the flood with tenants
# (interactive before batch, tenants in turn); the flood with today's single FIFO (the same keys
# in one tenant). Prints per tenant TTFT p50/p99 and throughput, the interactive TTFT p99
# against the run without the flood, and the batch tenant's share of the capacity left.
# Usage: hack/bench-tenants.sh [N] [SECONDS_PER_RUN] [HEADROOM]   (HEADROOM: the flood run's
#        --serve-batch-headroom, default 1; a run with 0 is always made beside it)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --tenants "${1:-8}" --seconds "${2:-60}" --headroom "${3:-1}"
