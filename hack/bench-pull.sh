#!/usr/bin/env bash
# The issue-4 benchmark (not a test): pull and unpack a ~100 MB image (4 layers, 5000 files)
# from a local registry with the agent's puller and with `ctr images pull --plain-http`, each
# into a fresh namespace, three rounds; prints both times and the ratio. The environment and
# builds are hack/bench.sh's.
# Usage: hack/bench-pull.sh [--rounds 3]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCHIVE=$("$ROOT/hack/make-test-image.sh" --layers 4 --files 1250 --size 20 --out "$ROOT/target/images-big")
echo "bench: $(du -h "$ARCHIVE" | cut -f1) image" >&2
exec "$ROOT/hack/bench.sh" --pull-archive "$ARCHIVE" "$@"
