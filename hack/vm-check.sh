#!/usr/bin/env bash
# Checks ollama-fleet on a host as users run it: a Debian 12 VM with cgroup v2 and systemd as
# PID 1, Debian's containerd, runc, crun and etcd-server, and the project's Debian package
# installed with apt and started by its systemd unit. Inside, hack/vm/guest-check.sh runs the
# check table (limits in the v2 files, swap, OOMKilled also from memory.events, maxMemory
# rotation, crash replacement, adoption across an agent restart, cpuset pinning, the gateway, a
# host without /etc/hosts) once per configuration:
#   runc            fleets on the default runtime
#   crun            fleets on runtime.binaryName crun (allowed with --allow-runtime)
#   systemd-cgroup  runc again with containerd's SystemdCgroup = true in its config
# It prints one table per configuration and exits non-zero on any miss.
#
#   hack/vm-check.sh [--only CONFIG]... [--rebuild] [--dir DIR] [--keep] [--deb FILE]
#
#   --only CONFIG  run only this configuration (repeatable; default all three)
#   --rebuild      build the VM image again (default: reuse the cached one)
#   --dir DIR      image cache and run directory (default /var/tmp/ollama-fleet-vm)
#   --keep         keep the run's disk overlay and share afterwards
#   --deb FILE     the package to install (default: build it with hack/deb.sh)
#
# The VM runs under qemu's TCG (-cpu max, no KVM: KVM with -cpu host aborts on this kind of
# machine), 2 vCPUs on 2 sockets (so socket pinning means something), 3 GiB of RAM and 1 GiB of
# swap (so "no swap" can be seen). The image (a debootstrapped Debian 12 on an ext4 disk, ~1 GB)
# is built once, in about 4 minutes, and cached under DIR keyed by its package list; each run
# boots a copy-on-write overlay of it. Needs root, debootstrap, qemu-system-x86 and qemu-utils
# (installed when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=/var/tmp/ollama-fleet-vm REBUILD=0 KEEP=0 DEB="" ONLY=()
while (($#)); do
  case $1 in
    --only) case $2 in runc|crun|systemd-cgroup) ONLY+=("$2") ;; *) echo "vm-check: --only takes runc, crun or systemd-cgroup" >&2; exit 2 ;; esac; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --deb) DEB=$(realpath "$2"); shift 2 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "vm-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
((${#ONLY[@]})) || ONLY=(runc crun systemd-cgroup)
die() { echo "vm-check: error: $*" >&2; exit 1; }
log() { echo "vm-check: $(date +%T) $*" >&2; }
[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot and the image need it)"

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; }
fi

# What the VM's Debian has: a host's boot (kernel, systemd, udev), what an operator installs
# beside the package (containerd, runc, crun, etcd), and what the check itself calls.
PACKAGES=linux-image-amd64,initramfs-tools,systemd,systemd-sysv,udev,kmod,dbus,containerd,runc,crun,etcd-server,etcd-client,curl,ca-certificates,procps,iproute2,jq
IMAGE_VERSION=1
KEY=$(printf '%s %s' "$PACKAGES" "$IMAGE_VERSION" | sha256sum | cut -c1-12)
IMAGE=$DIR/image-$KEY
mkdir -p "$DIR"

mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    awk '$1 == "deb" && $3 == "bookworm" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f"
  done
}

# The image: a debootstrapped root turned into an ext4 disk (mkfs.ext4 -d, no loop device), and
# the kernel and initrd beside it for qemu's -kernel/-initrd.
build_image() {
  local root=$IMAGE.root mirror
  mirror=$(mirror | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  [[ -d $root ]] && rm -rf --one-file-system "$root"
  log "building the VM image: debootstrap bookworm from $mirror (log: $IMAGE.log)"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$mirror" >"$IMAGE.log" 2>&1 ||
    die "debootstrap failed; see $IMAGE.log"
  echo vmnode >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmnode\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  : >"$root/etc/resolv.conf"
  cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 defaults,errors=remount-ro 0 1
/swapfile none swap sw 0 0
share /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0
FSTAB
  mkdir -p "$root/mnt/share"
  dd if=/dev/zero of="$root/swapfile" bs=1M count=1024 status=none
  chmod 600 "$root/swapfile"
  mkswap "$root/swapfile" >/dev/null
  passwd -R "$root" -d root >/dev/null
  # The check: run once the host is up, then power off.
  cat >"$root/etc/systemd/system/vm-check.service" <<'UNIT'
[Unit]
Description=ollama-fleet host check (hack/vm-check.sh)
After=multi-user.target containerd.service etcd.service
RequiresMountsFor=/mnt/share

[Service]
Type=oneshot
ExecStart=/bin/sh -c '/bin/bash /mnt/share/guest-check.sh >/mnt/share/guest.log 2>&1; echo $? >/mnt/share/guest.rc'
ExecStartPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/vm-check.service "$root/etc/systemd/system/multi-user.target.wants/vm-check.service"
  # A quiet, quick boot: no getty waiting on the serial line, no network to wait for.
  systemctl --root="$root" mask serial-getty@ttyS0.service getty@tty1.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true
  rm -f "$root/usr/sbin/policy-rc.d"
  apt-get -o Dir="$root" clean 2>/dev/null || rm -rf "$root/var/cache/apt/archives/"*.deb
  cp -L "$root/vmlinuz" "$IMAGE.vmlinuz"
  cp -L "$root/initrd.img" "$IMAGE.initrd"
  rm -f "$IMAGE.img"
  mkfs.ext4 -q -L root -d "$root" "$IMAGE.img" 4G || die "mkfs.ext4 -d failed"
  rm -rf --one-file-system "$root"
  log "VM image ready: $IMAGE.img"
}

if ((REBUILD)) || [[ ! -f $IMAGE.img || ! -f $IMAGE.vmlinuz ]]; then
  build_image
fi
[[ ${VM_IMAGE_ONLY:-0} == 1 ]] && exit 0

# The run: the package, the sim image and the check on a 9p share; a copy-on-write overlay of
# the image; qemu until the guest powers itself off.
RUN=$DIR/run
rm -rf "$RUN"
mkdir -p "$RUN/share"
if [[ -z $DEB ]]; then
  DEB=$("$ROOT/hack/deb.sh" --out "$DIR/deb") || die "hack/deb.sh failed"
fi
cp "$DEB" "$RUN/share/"
"$ROOT/hack/sim-image.sh" --out "$RUN/images" >/dev/null || die "hack/sim-image.sh failed"
cp "$RUN/images/ollama-sim.oci.tar" "$RUN/share/"
cp "$ROOT/hack/vm/guest-check.sh" "$RUN/share/"
echo "${ONLY[*]}" >"$RUN/share/configs"
qemu-img create -q -f qcow2 -b "$IMAGE.img" -F raw "$RUN/disk.qcow2"

BUDGET=$((300 + 600 * ${#ONLY[@]}))
log "booting the VM (TCG, 2 sockets, 3 GiB; configurations: ${ONLY[*]}; at most ${BUDGET}s; console: $RUN/console.log)"
START=$SECONDS
status=0
timeout "$BUDGET" qemu-system-x86_64 -machine q35 -cpu max -smp 2,sockets=2,cores=1,threads=1 -m 3G \
  -display none -monitor none -serial "file:$RUN/console.log" -nic none -no-reboot \
  -kernel "$IMAGE.vmlinuz" -initrd "$IMAGE.initrd" \
  -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0" \
  -drive "file=$RUN/disk.qcow2,if=virtio,format=qcow2" \
  -virtfs "local,path=$RUN/share,mount_tag=share,security_model=none,id=share" || status=$?
ELAPSED=$((SECONDS - START))
((status == 124)) && log "the VM did not finish within ${BUDGET}s"

RESULTS=$RUN/share/results
[[ -f $RESULTS ]] || die "no results from the guest (exit $status); see $RUN/console.log and $RUN/share/guest.log"
echo
printf '%-15s %-28s %-5s %s\n' CONFIG CHECK "" DETAIL
misses=0
while IFS='|' read -r config name verdict detail; do
  printf '%-15s %-28s %-5s %s\n' "$config" "$name" "$verdict" "$detail"
  [[ $verdict == ok ]] || misses=$((misses + 1))
done <"$RESULTS"
for config in "${ONLY[@]}"; do
  grep -q "^$config|gateway|" "$RESULTS" || { echo "$config: the check did not finish"; misses=$((misses + 1)); }
done
echo
echo "vm-check: ${ELAPSED}s in the VM (boot, install, ${#ONLY[@]} configuration(s)); guest log $RUN/share/guest.log, agent log $RUN/share/agent.log"
((KEEP)) || rm -f "$RUN/disk.qcow2"
if ((misses || status)); then
  echo "vm-check: FAILED ($misses miss(es), qemu exit $status)" >&2
  exit 1
fi
echo "vm-check: passed"
