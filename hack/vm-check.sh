#!/usr/bin/env bash
# Checks ollama-fleet on hosts as users run them: Debian VMs with cgroup v2 and systemd as PID 1
# (Debian 12: containerd 1.6, runc 1.1.5, crun 1.8; Debian 13: containerd 1.7, runc 1.1.15,
# crun 1.21), Debian's etcd-server, and the project's Debian package installed with apt and
# started by its systemd unit. Inside, hack/vm/guest-check.sh runs the
# check table (limits in the v2 files, swap, OOMKilled also from memory.events, maxMemory
# rotation, crash replacement, adoption across an agent restart, cpuset pinning, the gateway, a
# host without /etc/hosts) once per configuration:
#   runc            fleets on the default runtime
#   crun            fleets on runtime.binaryName crun (allowed with --allow-runtime)
#   systemd-cgroup  runc again with containerd's SystemdCgroup = true in its config
# It prints a table per VM and exits non-zero on any miss.
#
#   hack/vm-check.sh [--suite S]... [--only CONFIG]... [--rebuild] [--dir DIR] [--keep]
#                    [--deb FILE | --binary PATH] [--sim-binary PATH]
#
#   --suite S      the Debian release of the VM: bookworm or trixie (repeatable; default both,
#                  one VM after the other)
#   --only CONFIG  run only this configuration (repeatable; default all three)
#   --rebuild      build the VM image again (default: reuse the cached one)
#   --dir DIR      image cache and run directory (default /var/tmp/ollama-fleet-vm)
#   --keep         keep the run's disk overlay and share afterwards
#   --deb FILE     the package to install (default: build it with hack/deb.sh)
#   --binary PATH  build the package around this ollama-fleet binary (default: a release build)
#   --sim-binary PATH  the ollama-sim binary of the test image (default: a debug build)
#
# The VM runs under qemu's TCG (-cpu max, no KVM: KVM with -cpu host aborts on this kind of
# machine), 2 vCPUs on 2 sockets (so socket pinning means something), 3 GiB of RAM and 512 MiB
# of swap (so "no swap" means something). Each image (a debootstrapped Debian on an ext4 disk,
# ~1 GB) is built once, in about 2 minutes, and cached under DIR keyed by its suite and package
# list; each run boots a copy-on-write overlay of it. A VM with the three configurations takes
# about 7 minutes. Needs root, debootstrap, qemu-system-x86 and qemu-utils
# (installed when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=/var/tmp/ollama-fleet-vm REBUILD=0 KEEP=0 DEB="" BINARY="" SIM_BINARY="" ONLY=() SUITES=()
while (($#)); do
  case $1 in
    --suite) case $2 in bookworm|trixie) SUITES+=("$2") ;; *) echo "vm-check: --suite takes bookworm or trixie" >&2; exit 2 ;; esac; shift 2 ;;
    --only) case $2 in runc|crun|systemd-cgroup) ONLY+=("$2") ;; *) echo "vm-check: --only takes runc, crun or systemd-cgroup" >&2; exit 2 ;; esac; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --deb) DEB=$(realpath "$2"); shift 2 ;;
    --binary) BINARY=$(realpath "$2"); shift 2 ;;
    --sim-binary) SIM_BINARY=$(realpath "$2"); shift 2 ;;
    -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "vm-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
((${#ONLY[@]})) || ONLY=(runc crun systemd-cgroup)
((${#SUITES[@]})) || SUITES=(bookworm trixie)
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
IMAGE_VERSION=2
mkdir -p "$DIR"

# shellcheck source=hack/debian-mirror.sh
source "$ROOT/hack/debian-mirror.sh"

# The image: a debootstrapped root turned into an ext4 disk (mkfs.ext4 -d, no loop device), and
# the kernel and initrd beside it for qemu's -kernel/-initrd.
build_image() { # build_image SUITE
  local suite=$1 root=$IMAGE.root mirror
  mirror=$(debian_mirror)
  [[ -d $root ]] && rm -rf --one-file-system "$root"
  log "building the VM image: debootstrap $suite from $mirror (log: $IMAGE.log)"
  debootstrap --variant=minbase --include="$PACKAGES" "$suite" "$root" "$mirror" >"$IMAGE.log" 2>&1 ||
    die "debootstrap failed; see $IMAGE.log"
  echo vmnode >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmnode\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  : >"$root/etc/resolv.conf"
  cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 defaults,errors=remount-ro 0 1
share /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0
FSTAB
  mkdir -p "$root/mnt/share"
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
  local kernel initrd
  kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
  initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
  [[ -f $kernel && -f $initrd ]] || die "no kernel or initrd in the $suite root's /boot"
  cp "$kernel" "$IMAGE.vmlinuz"
  cp "$initrd" "$IMAGE.initrd"
  rm -f "$IMAGE.img"
  mkfs.ext4 -q -L root -d "$root" "$IMAGE.img" 4G || die "mkfs.ext4 -d failed"
  rm -rf --one-file-system "$root"
  log "VM image ready: $IMAGE.img"
}

image_of() { # image_of SUITE: the cached image's path prefix
  echo "$DIR/image-$1-$(printf '%s %s %s' "$1" "$PACKAGES" "$IMAGE_VERSION" | sha256sum | cut -c1-12)"
}
for suite in "${SUITES[@]}"; do
  IMAGE=$(image_of "$suite")
  if ((REBUILD)) || [[ ! -f $IMAGE.img || ! -f $IMAGE.vmlinuz ]]; then
    build_image "$suite"
  fi
done
[[ ${VM_IMAGE_ONLY:-0} == 1 ]] && exit 0

# What every VM gets on its 9p share: the package, the sim image, the check.
STAGE=$DIR/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
if [[ -z $DEB ]]; then
  DEB=$("$ROOT/hack/deb.sh" --out "$DIR/deb" ${BINARY:+--binary "$BINARY"}) || die "hack/deb.sh failed"
fi
cp "$DEB" "$STAGE/"
"$ROOT/hack/sim-image.sh" --out "$DIR/images" ${SIM_BINARY:+--binary "$SIM_BINARY"} >/dev/null || die "hack/sim-image.sh failed"
cp "$DIR/images/ollama-sim.oci.tar" "$STAGE/"
cp "$ROOT/hack/vm/guest-check.sh" "$STAGE/"
echo "${ONLY[*]}" >"$STAGE/configs"

# One VM: a copy-on-write overlay of the suite's image, qemu until the guest powers itself off.
# Prints the table; returns the number of misses.
run_vm() { # run_vm SUITE
  local suite=$1 image run budget start status=0 misses=0
  image=$(image_of "$suite")
  run=$DIR/run-$suite
  rm -rf "$run"
  mkdir -p "$run"
  cp -r "$STAGE" "$run/share"
  qemu-img create -q -f qcow2 -b "$image.img" -F raw "$run/disk.qcow2"
  budget=$((300 + 600 * ${#ONLY[@]}))
  log "booting the $suite VM (TCG, 2 sockets, 3 GiB; configurations: ${ONLY[*]}; at most ${budget}s; console: $run/console.log)"
  start=$SECONDS
  timeout "$budget" qemu-system-x86_64 -machine q35 -cpu max -smp 2,sockets=2,cores=1,threads=1 -m 3G \
    -display none -monitor none -serial "file:$run/console.log" -nic none -no-reboot \
    -kernel "$image.vmlinuz" -initrd "$image.initrd" \
    -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0" \
    -drive "file=$run/disk.qcow2,if=virtio,format=qcow2" \
    -virtfs "local,path=$run/share,mount_tag=share,security_model=none,id=share" || status=$?
  ELAPSED+=("$suite: $((SECONDS - start))s")
  ((status == 124)) && log "the $suite VM did not finish within ${budget}s"
  local results=$run/share/results
  if [[ ! -f $results ]]; then
    echo "$suite: no results from the guest (qemu exit $status); see $run/console.log and $run/share/guest.log"
    return 1
  fi
  echo
  printf '%-9s %-15s %-28s %-5s %s\n' SUITE CONFIG CHECK "" DETAIL
  while IFS='|' read -r config name verdict detail; do
    printf '%-9s %-15s %-28s %-5s %s\n' "$suite" "$config" "$name" "$verdict" "$detail"
    [[ $verdict == ok ]] || misses=$((misses + 1))
  done <"$results"
  for config in "${ONLY[@]}"; do
    grep -q "^$config|gateway|" "$results" || { echo "$suite $config: the check did not finish"; misses=$((misses + 1)); }
  done
  ((status == 0)) || misses=$((misses + 1))
  ((KEEP)) || rm -f "$run/disk.qcow2"
  return "$misses"
}

ELAPSED=()
total=0
for suite in "${SUITES[@]}"; do
  misses=0
  run_vm "$suite" || misses=$?
  total=$((total + misses))
done
echo
echo "vm-check: time in the VMs (boot, install, ${#ONLY[@]} configuration(s) each): ${ELAPSED[*]}; logs in $DIR/run-<suite>/share"
if ((total)); then
  echo "vm-check: FAILED ($total miss(es))" >&2
  exit 1
fi
echo "vm-check: passed"
