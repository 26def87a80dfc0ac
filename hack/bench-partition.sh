#!/usr/bin/env bash
# The issue-11 benchmark (not a test): a silent partition between the agent and a private etcd
# (iptables DROP for 30 s, twice the lease TTL), ROUNDS times, release builds. Prints, per round:
# crash replacement before and during the partition, how long the CLI took to give up, and how
# long after the heal the node and status keys were back. The environment and builds are
# hack/bench.sh's.
# Usage: hack/bench-partition.sh [ROUNDS]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --partition "${1:-3}"
