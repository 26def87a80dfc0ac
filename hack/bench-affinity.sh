#!/usr/bin/env bash
# The conversation-affinity benchmark (issue 22; not a test): multi-turn conversations (a
# shared ~1k-token system prompt, a document each, short questions with think time) against
# instances whose prompt cache the agent bounds, through HAProxy leastconn + maxconn 1, the
# gateway with --serve-affinity false, and the gateway. Prints TTFT p50/p90 of turns 2 and
# later, first turns, turns/s, failures and the gateway's affinity counters per setup, the
# ratios against the targets, and a single-turn workload (nothing to reuse) for each setup.
# Usage: hack/bench-affinity.sh [sim|engine] [N] [CONVERSATIONS] [extra fleet-bench args]
#   extra args: --turns 6 --answer 16 --doc-words W (with documents shorter than the 750-word
#   system prompt, llama-server does not consult its prompt cache when a conversation comes
#   back to a slot another one used meanwhile, and affinity gains little), --single 0
#   (skip the single-turn workload).
#   sim (default): N sims (default 16), 48 conversations, 1500-word documents; they model the
#   prompt cache, llama-server's rules included.
#   engine: N real llama-server instances (default 4), 12 conversations, 1000-word documents,
#   10 s think time (four engines share this machine's 2 cores: at 2 s every setup only
#   queues; hack/llama-engine.sh builds the engine the first time, ~7 minutes here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=${1:-sim}
case $MODE in
  sim) N=${2:-16} C=${3:-48} ENGINE=0 THINK=2 DOCS=1500 ;;
  engine) N=${2:-4} C=${3:-12} ENGINE=1 THINK=10 DOCS=1000 ;;
  *) echo "usage: hack/bench-affinity.sh [sim|engine] [N] [CONVERSATIONS]" >&2; exit 2 ;;
esac
shift $(( $# < 3 ? $# : 3 ))
exec "$ROOT/hack/bench.sh" --affinity "$N" --conversations "$C" --engine "$ENGINE" "$@" \
  --think "$THINK" --doc-words "$DOCS" # (the first of a flag counts: yours come first)
