#!/usr/bin/env bash
# Installs the Debian packages the project needs to build, test and run, when missing.
# Safe to run again: it does nothing when everything is present.
set -euo pipefail

PACKAGES=(etcd-server etcd-client containerd runc protobuf-compiler busybox-static curl binutils docker-registry skopeo python3 openssl)

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
  apt-get update -qq >&2
  # A package's post-install may try to start its systemd service; we never use those.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Debian may have started system etcd/containerd services; ours run on their own ports and
# sockets, so they are left alone.
