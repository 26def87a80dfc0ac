#!/usr/bin/env bash
# The control plane at the target scale (issue 15; not a test), the way kubemark measures
# Kubernetes: one real etcd (run with the flags ARCHITECTURE.md recommends) and NODES hollow
# nodes, each a real agent (its own etcd connection, watch, lease, planner, publisher) on the
# in-memory runtime, all in one process. Prints converge time and the watch's fan-out, a rolling
# update of every node with an etcd restart in its middle, crash replacement, etcd requests/s,
# writes/s and WAL bytes/s during converge, the rollout and an idle period, etcd's DB size,
# `ollama-fleet get` latency over every status key, and the agents' memory and idle CPU.
# Usage: hack/bench-scale.sh [--nodes 172] [--per-node 58] [--fleets 1] [--idle SECONDS(300)]
#                            [--start-delay-ms 300] [--crashes 20]
# The 833-per-node shape: hack/bench-scale.sh --nodes 12 --per-node 833
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nodes=172 rest=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done
exec "$ROOT/hack/bench.sh" --scale "$nodes" "${rest[@]}"
