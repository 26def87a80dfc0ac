#!/usr/bin/env bash
# The issue-24 fault benchmark (not a test): two nodes behind the shipped HAProxy config, three
# clients streaming without pause, then one fault at a time on node 1 or on etcd (agent SIGTERM
# + start, agent kill -9 + start, containerd restart, etcd stopped 60 s, etcd silently
# partitioned 60 s, an instance OOM-killed, an instance hung, node 1's log disk full for 30 s).
# Prints a table: requests sent, failed and cut, instances replaced, lost or duplicated, node 1's
# lowest serving capacity and the time back to full capacity. Release builds; the environment
# is hack/bench.sh's (needs root: iptables, a tmpfs mount). About 6 minutes.
# Usage: hack/chaos.sh [FAULT,...]   e.g. hack/chaos.sh agent-sigterm,etcd-stop
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$ROOT/hack/bench.sh" --chaos 1 --faults "${1:-}"
