#!/usr/bin/env bash
# The conversation-affinity benchmark (issue 22; not a test): multi-turn conversations (a
# shared ~1k-token system prompt, a document each, short questions with think time) against
# instances whose prompt cache the agent bounds, through HAProxy leastconn + maxconn 1, the
# gateway with --serve-affinity false, and the gateway. Prints TTFT p50/p90 of turns 2 and
# later, first turns, turns/s, failures and the gateway's affinity counters per setup, the
# ratios against the targets, and a single-turn workload (nothing to reuse) for each setup.
# Usage: hack/bench-affinity.sh [sim|engine] [N] [CONVERSATIONS] [extra fleet-bench args]
#   sim (default): N sims (default 16), 48 conversations; they model the prompt cache.
#   engine: N real llama-server instances (default 4), 12 conversations (hack/llama-engine.sh
#   builds the engine the first time, ~7 minutes here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=${1:-sim}
case $MODE in
  sim) N=${2:-16} C=${3:-48} ENGINE=0 ;;
  engine) N=${2:-4} C=${3:-12} ENGINE=1 ;;
  *) echo "usage: hack/bench-affinity.sh [sim|engine] [N] [CONVERSATIONS]" >&2; exit 2 ;;
esac
shift $(( $# < 3 ? $# : 3 ))
exec "$ROOT/hack/bench.sh" --affinity "$N" --conversations "$C" --engine "$ENGINE" "$@"
