#!/usr/bin/env bash
# Builds the Debian package of ollama-fleet, as an operator installs it on a node:
#   apt install ./ollama-fleet_<version>_<arch>.deb containerd etcd-server   # etcd on one or more nodes
#   editor /etc/default/ollama-fleet                                        # etcd endpoints, labels
#   systemctl enable --now ollama-fleet-agent
#
#   hack/deb.sh [--out DIR] [--binary PATH]
#
#   --out DIR      where the .deb goes (default target/deb); its path is printed on stdout
#   --binary PATH  the ollama-fleet binary to package (default: cargo build --release)
#
# The package holds:
#   /usr/bin/ollama-fleet                               the one binary (CLI and agent)
#   /lib/systemd/system/ollama-fleet-agent.service      the agent's unit (not started on install)
#   /lib/systemd/system/ollama-fleet-agent.socket       the gateway's socket, kept across restarts
#                                                       (optional, not enabled on install)
#   /etc/default/ollama-fleet                           its settings (a conffile: kept on upgrade)
#   /var/lib/ollama-fleet, /var/lib/ollama-fleet/models the state directory and the model cache
#   /usr/share/ollama-fleet/                            the JSON Schema, example fleets, the
#                                                       HAProxy, nginx and Grafana files
#   /usr/share/doc/ollama-fleet/                        README, ARCHITECTURE, SECURITY, copyright
# It depends on containerd and runc, recommends etcd-server and etcd-client, suggests crun.
# An upgrade restarts a running agent (its instances keep running: adoption); removing the
# package stops the agent and leaves the instances and the state directory alone.
# Built with dpkg-deb alone (no cargo-deb); the same binary gives the same package bytes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/deb BINARY=""
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "deb: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
die() { echo "deb: error: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian's dpkg package)"

if [[ -z $BINARY ]]; then
  echo "deb: cargo build --release -p ollama-fleet" >&2
  (cd "$ROOT" && cargo build --release -q -p ollama-fleet) || die "the release build failed"
  BINARY=$ROOT/target/release/ollama-fleet
fi
[[ -x $BINARY ]] || die "$BINARY is not an executable"
VERSION=$(awk -F'"' '/^\[workspace.package\]/ {w=1} w && /^version *=/ {print $2; exit}' "$ROOT/Cargo.toml")
[[ -n $VERSION ]] || die "no version in Cargo.toml's [workspace.package]"
ARCH=$(dpkg --print-architecture)
NAME=ollama-fleet_${VERSION}_${ARCH}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
P=$STAGE/$NAME
install -d "$P/DEBIAN" "$P/usr/bin" "$P/lib/systemd/system" "$P/etc/default" \
  "$P/var/lib/ollama-fleet/models" "$P/usr/share/ollama-fleet" "$P/usr/share/doc/ollama-fleet"
install -m 0755 "$BINARY" "$P/usr/bin/ollama-fleet"
strip --strip-unneeded "$P/usr/bin/ollama-fleet" 2>/dev/null || true
sed 's|/usr/local/bin/ollama-fleet|/usr/bin/ollama-fleet|' "$ROOT/manifests/systemd/ollama-fleet-agent.service" \
  | sed '/^#   install /d; /^#   systemctl daemon-reload/d' >"$P/lib/systemd/system/ollama-fleet-agent.service"
grep -q '^ExecStart=/usr/bin/ollama-fleet agent' "$P/lib/systemd/system/ollama-fleet-agent.service" ||
  die "the unit's ExecStart was not rewritten to /usr/bin"
chmod 0644 "$P/lib/systemd/system/ollama-fleet-agent.service"
# The gateway's socket unit: shipped, not enabled (see its comments).
sed '/^#   install /d; /^#   systemctl daemon-reload/d' "$ROOT/manifests/systemd/ollama-fleet-agent.socket" \
  >"$P/lib/systemd/system/ollama-fleet-agent.socket"
chmod 0644 "$P/lib/systemd/system/ollama-fleet-agent.socket"
install -m 0644 "$ROOT/manifests/systemd/ollama-fleet.env" "$P/etc/default/ollama-fleet"
install -m 0644 "$ROOT/schemas/ollamafleet.schema.json" "$P/usr/share/ollama-fleet/"
cp -r "$ROOT/manifests/examples" "$ROOT/manifests/haproxy" "$ROOT/manifests/nginx" \
  "$ROOT/manifests/grafana" "$P/usr/share/ollama-fleet/"
for doc in README.md ARCHITECTURE.md SECURITY.md; do
  gzip -9n <"$ROOT/$doc" >"$P/usr/share/doc/ollama-fleet/$doc.gz"
done
cat >"$P/usr/share/doc/ollama-fleet/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ollama-fleet

Files: *
Copyright: the ollama-fleet authors
License: see the project's source repository
COPYRIGHT
chmod -R u+rwX,go+rX,go-w "$P/usr/share" "$P/var/lib/ollama-fleet"
chmod 0755 "$P/var/lib/ollama-fleet"
chmod 0755 "$P/var/lib/ollama-fleet/models"

echo /etc/default/ollama-fleet >"$P/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$P" | cut -f1)
cat >"$P/DEBIAN/control" <<CONTROL
Package: ollama-fleet
Version: $VERSION
Architecture: $ARCH
Maintainer: ollama-fleet developers <ollama-fleet@localhost>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), libgcc-s1, containerd (>= 1.6), runc
Recommends: etcd-server, etcd-client
Suggests: crun, haproxy
Section: admin
Priority: optional
Homepage: https://github.com/ollama-fleet/ollama-fleet
Description: run fleets of identical Ollama servers on bare-metal containerd
 A declarative OllamaFleet manifest stored in etcd, and an agent on every node
 that converges the node's containerd to it: creates and limits instances in
 their own cgroups, probes them, rotates them, rolls out changes, replaces
 crashed or OOM-killed ones, adopts what runs after its own restart, and serves
 an Ollama-compatible gateway over the node's instances.
CONTROL
cat >"$P/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
  # An upgrade restarts a running agent; its instances keep running and are adopted.
  if [ -n "$2" ]; then
    systemctl try-restart ollama-fleet-agent.service >/dev/null || true
  else
    echo "ollama-fleet: set the etcd endpoints and labels in /etc/default/ollama-fleet, then: systemctl enable --now ollama-fleet-agent"
  fi
fi
exit 0
SCRIPT
cat >"$P/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
# Removal stops the agent (KillMode=process: its instances keep running under containerd).
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl disable --now ollama-fleet-agent.socket ollama-fleet-agent.service >/dev/null 2>&1 || true
fi
exit 0
SCRIPT
cat >"$P/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
  echo "ollama-fleet: /var/lib/ollama-fleet (logs, the model cache) and the instances in containerd's ollama-fleet namespace are left in place"
fi
exit 0
SCRIPT
chmod 0755 "$P/DEBIAN/postinst" "$P/DEBIAN/prerm" "$P/DEBIAN/postrm"
find "$P" -exec touch -h -d @"${SOURCE_DATE_EPOCH:-0}" {} +
mkdir -p "$OUT"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0} dpkg-deb --root-owner-group -Zxz --build "$P" "$OUT/$NAME.deb" >/dev/null
echo "deb: built $OUT/$NAME.deb ($(du -h "$OUT/$NAME.deb" | cut -f1))" >&2
echo "$OUT/$NAME.deb"
