# Sourced by scripts that debootstrap a Debian root (fresh-check.sh, vm-check.sh):
# debian_mirror prints the Debian mirror apt is configured with (deb822 .sources or one-line
# sources.list), or Debian's own when none is found.
debian_mirror() {
  local f found=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    found=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' "$f")
    [[ -n $found ]] && break
  done
  if [[ -z $found ]]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [[ -f $f ]] || continue
      found=$(awk '$1 == "deb" && $3 == "bookworm" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
      [[ -n $found ]] && break
    done
  fi
  echo "${found:-http://deb.debian.org/debian}"
}
