#!/usr/bin/env bash
# Proves the README's two commands on a fresh Debian 12 machine, whatever this machine has
# installed: builds a minimal Debian 12 root with debootstrap (from the mirror apt is configured
# with), copies the checkout in, binds in only rustup's ~/.cargo and ~/.rustup, and runs inside it
#   hack/quickstart.sh, then hack/dev-env.sh down --purge,
#   hack/test.sh with a quick slice of the end-to-end tests (or every test with --full),
#   optionally a short hack/bench.sh run (--bench).
# Each step's time is printed at the end. Run it whenever dependencies or scripts change.
#
#   hack/fresh-check.sh [--full] [--bench] [--keep] [--dir DIR]
#
#   --full     run the whole test suite inside (default: a slice that touches every external
#              tool: etcd, etcdctl, containerd, ctr, runc limits, the registry, skopeo, python3,
#              openssl, iptables)
#   --bench    also run hack/bench.sh with a small fleet (release build, about 5 more minutes)
#   --keep     keep the root afterwards (default: removed)
#   --dir DIR  where the root and the log go (default /var/tmp/ollama-fleet-fresh)
#
# Needs root. Everything runs in a private mount and PID namespace: the binds vanish and every
# process started inside (etcd, containerd, shims) is killed when the check ends, however it ends.
# The root shares this machine's network (apt and cargo need it), so ports the demo uses
# (9477, 21434-21437) must be free: stop a running quickstart first (hack/dev-env.sh down).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=/var/tmp/ollama-fleet-fresh FULL=0 BENCH=0 KEEP=0
while (($#)); do
  case $1 in
    --full) FULL=1; shift ;;
    --bench) BENCH=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fresh-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
die() { echo "fresh-check: error: $*" >&2; exit 1; }
log() { echo "fresh-check: $*" >&2; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot and mounts need it)"
CARGO_DIR=${CARGO_HOME:-$HOME/.cargo} RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
[[ -x $CARGO_DIR/bin/cargo && -d $RUSTUP_DIR/toolchains ]] ||
  die "rustup's toolchain is not in $CARGO_DIR and $RUSTUP_DIR (set CARGO_HOME/RUSTUP_HOME)"
for port in 9477 21434 21435 21436 21437; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use here, and the root shares this network; stop it first (hack/dev-env.sh down)"
  fi
done
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2; }
fi

# The Debian mirror apt is configured with.
# shellcheck source=hack/debian-mirror.sh
source "$ROOT/hack/debian-mirror.sh"
MIRROR=$(debian_mirror)

CHROOT=$DIR/root
LOG=$DIR/fresh-check.log
# Removes the root. Its binds lived only in the check's private mount namespace; refuse anyway if
# anything is mounted below it here (rm would go through ~/.cargo and ~/.rustup).
remove_root() {
  [[ -d $CHROOT ]] || return 0
  if grep -qF " $CHROOT" /proc/self/mounts; then
    die "something is still mounted under $CHROOT; not removing it (see /proc/self/mounts)"
  fi
  rm -rf --one-file-system "$CHROOT"
}
mkdir -p "$DIR"
remove_root
: >"$LOG"
TIMES=()
timed() { # timed NAME COMMAND...: runs it, records its time
  local name=$1 start=$SECONDS; shift
  "$@"
  TIMES+=("$(printf '%-34s %4ds' "$name" $((SECONDS - start)))")
}

build_root() {
  log "debootstrap --variant=minbase bookworm from $MIRROR (log: $LOG)"
  debootstrap --variant=minbase bookworm "$CHROOT" "$MIRROR" >>"$LOG" 2>&1 ||
    die "debootstrap failed; see $LOG"
  # The apt sources and name resolution of a real machine; no services started by packages
  # (a chroot has no init; on a real machine Debian's own etcd/containerd may start, harmlessly).
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$CHROOT/etc/apt/sources.list.d/"
    rm -f "$CHROOT/etc/apt/sources.list"
  elif [[ -f /etc/apt/sources.list ]]; then
    cp /etc/apt/sources.list "$CHROOT/etc/apt/sources.list"
  fi
  cp -L /etc/resolv.conf "$CHROOT/etc/resolv.conf"
  # The site's own trust anchors (a network that inspects TLS has them on every machine); the
  # ca-certificates package, once installed by the project's scripts, adds them to its bundle.
  mkdir -p "$CHROOT/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$CHROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
  [[ -s $CHROOT/etc/hosts ]] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$CHROOT/etc/hosts"
  printf '#!/bin/sh\nexit 101\n' >"$CHROOT/usr/sbin/policy-rc.d"
  chmod 0755 "$CHROOT/usr/sbin/policy-rc.d"
  mkdir -p "$CHROOT/root/.cargo" "$CHROOT/root/.rustup" "$CHROOT/src"
}

copy_checkout() {
  # What git knows of (tracked and untracked, not ignored): the checkout without target/.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -xf - -C "$CHROOT/src"
}

# The commands run inside, in order; the first failure ends the check.
INNER='set -euo pipefail
cd /src
step() { printf "\n\033[1m[fresh-check] %s\033[0m\n" "$*"; start=$SECONDS; }
done_() { echo "$1|$((SECONDS - start))" >>/fresh-times; }
step "hack/quickstart.sh"; hack/quickstart.sh; done_ "hack/quickstart.sh"
step "hack/dev-env.sh down --purge"; hack/dev-env.sh down --purge; done_ "hack/dev-env.sh down --purge"
if [[ $FRESH_FULL == 1 ]]; then
  step "hack/test.sh"; hack/test.sh; done_ "hack/test.sh (every test)"
else
  step "hack/test.sh (slice)"
  hack/test.sh -p fleet-e2e -- --exact sim_serves_on_its_ollama_host_port_within_its_limits \
    the_reconcile_loop_end_to_end registry_credentials tls_client_certificates_and_a_role_per_node \
    a_silent_partition_from_etcd_heals_by_itself nginx_and_haproxy_balance_over_two_gateways \
    the_official_client_speaks_to_the_gateway each_refusal_reaches_the_official_clients_in_their_shape
  done_ "hack/test.sh (slice)"
fi
if [[ $FRESH_BENCH == 1 ]]; then
  step "hack/bench.sh --n 8 --kills 3 --idle 3"; hack/bench.sh --n 8 --kills 3 --idle 3; done_ "hack/bench.sh (small)"
fi
'

run_inside() {
  # A private mount namespace (the binds vanish with it) and PID namespace (everything started
  # inside dies with its first process).
  unshare --mount --pid --fork --propagation private -- bash -c '
    set -euo pipefail
    mount --bind "$1" "$1"                        # runc wants / to be a mount point
    mount -t proc proc "$1/proc"
    mount --rbind /sys "$1/sys"                   # with the cgroup v1 controllers under it
    mount --rbind /dev "$1/dev"
    mount --bind "$2" "$1/root/.cargo"
    mount --bind "$3" "$1/root/.rustup"
    exec chroot "$1" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
      PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      FRESH_FULL="$4" FRESH_BENCH="$5" bash -c "$6"
  ' fresh-check "$CHROOT" "$CARGO_DIR" "$RUSTUP_DIR" "$FULL" "$BENCH" "$INNER"
}

START=$SECONDS
timed "debootstrap (minbase bookworm)" build_root
timed "copy the checkout" copy_checkout
log "running the README's commands inside $CHROOT (only rustup's toolchain is bound in)"
status=0
run_inside 2>&1 | tee -a "$LOG" || status=$?
if [[ -f $CHROOT/fresh-times ]]; then
  while IFS='|' read -r name secs; do TIMES+=("$(printf '%-34s %4ds' "$name" "$secs")"); done <"$CHROOT/fresh-times"
fi
((KEEP)) || remove_root
echo
echo "fresh-check: Debian 12 minbase from $MIRROR, rustup's toolchain only"
printf '  %s\n' "${TIMES[@]}"
printf '  %-34s %4ds\n' "total" $((SECONDS - START))
if ((status)); then
  echo "fresh-check: FAILED (exit $status); the whole output is in $LOG" >&2
  exit "$status"
fi
echo "fresh-check: passed"
