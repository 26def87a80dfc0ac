#!/usr/bin/env bash
# Installs the Debian packages the project needs to build, test, run and benchmark, when missing.
# Safe to run again: it does nothing (and prints nothing) when everything is present.
#
# A fresh Debian 12 machine needs only rustup's toolchain beforehand; hack/fresh-check.sh proves
# it in a minimal Debian root. When a script or test starts calling a new tool, add its package
# here (and run hack/fresh-check.sh).
set -euo pipefail

PACKAGES=(
  # Build: rustc links with the system C compiler and libc; ring and aws-lc-sys compile C;
  # etcd-client and containerd-client compile .proto files that import Google's well-known
  # types (libprotobuf-dev, which protobuf-compiler only recommends); cargo fetches crates over
  # HTTPS (ca-certificates).
  gcc libc6-dev protobuf-compiler libprotobuf-dev ca-certificates
  # Run: what the agent talks to, and the CLIs the scripts and tests drive them with.
  etcd-server etcd-client containerd runc
  # Scripts and tests: curl (quickstart, HTTP checks), strip (binutils, sim-image.sh), openssl
  # (make-test-image.sh), pkill/kill/free (procps), a local OCI registry and skopeo (registry
  # tests, bench-pull.sh), python3 (bcrypt hashes for registry credentials), a static busybox
  # for tiny test roots.
  curl binutils openssl procps docker-registry skopeo python3 busybox-static
  # Fault tests: iptables drops packets to a private etcd (a silent partition). The official
  # Ollama Python client runs in a virtualenv (python3-venv; hack/python-client.sh).
  iptables python3-venv
  # The node gateway's tests and benchmark: real proxies in front of it (nginx, HAProxy; their
  # services are not started, tests run their own), and promtool (Debian's prometheus) to check
  # the metrics exposition.
  nginx haproxy prometheus
  # The real engine (hack/llama-engine.sh): llama.cpp's llama-server builds from source with
  # cmake, make and a C++ compiler.
  cmake make g++
  # The host check (hack/vm-check.sh): a debootstrapped Debian image booted by qemu (TCG).
  debootstrap qemu-system-x86 qemu-utils
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "error: missing packages ${missing[*]}; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # No package's service is started by the install (nginx, HAProxy and Prometheus would take
  # ports of their own): a policy-rc.d refusing every start, for the install only.
  guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard"
    chmod +x "$guard"
    trap 'rm -f "$guard"' EXIT
  fi
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  if [[ -n $guard ]]; then rm -f "$guard"; trap - EXIT; fi
fi
# A package's post-install may have started Debian's own etcd or containerd service; ours run on
# their own ports and sockets (hack/dev-env.sh), so those are left alone.
