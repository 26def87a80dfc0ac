#!/usr/bin/env bash
# The issue-5 benchmark (not a test): N instances (default 58, one socket's worth) with the model
# pulled once and warmed, rollout maxUnavailable 10%, maxSurge 0; prints the time of a rolling
# update of env and of a rotation by age of every instance, and the fewest ready instances seen
# during each (polled every 200 ms), next to the floor the budget allows.
# Usage: hack/bench-lifecycle.sh [N]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --lifecycle "${1:-58}"
