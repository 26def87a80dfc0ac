#!/usr/bin/env bash
# The gateway's memory under large request bodies (issue 21; not a test): one agent serving two
# sim instances, its peak RSS (VmHWM, reset per case) while it takes a 60 MB JSON array, three
# at once, twenty 3 MB requests queued behind busy instances, and a 31 MB messages array; each
# against the bound 2 x (--serve-body-budget + the agent's RSS before).
# Usage: hack/bench-gateway-memory.sh [BUDGET_MIB]   (default 256, the agent's default)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --bodies "${1:-256}"
