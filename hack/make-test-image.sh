#!/usr/bin/env bash
# Builds a synthetic OCI image archive for pull benchmarks: LAYERS layers of FILES files of
# SIZE KiB each (incompressible bytes, so ~LAYERS*FILES*SIZE KiB on the wire), deterministic
# for the same arguments.
#   hack/make-test-image.sh --layers 4 --files 1250 --size 20 --out target/images-big
# Prints the archive path. Push it with: skopeo copy oci-archive:ARCHIVE:big docker://HOST/REPO:TAG
set -euo pipefail
LAYERS=4 FILES=1250 SIZE=20 OUT=target/images-big
while (($#)); do
  case $1 in
    --layers) LAYERS=$2; shift 2 ;;
    --files) FILES=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "make-test-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
"$(dirname "${BASH_SOURCE[0]}")/install-deps.sh"   # openssl; silent when present
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/blobs/sha256"
sha() { sha256sum "$1" | cut -d' ' -f1; }
DIFFS="" LAYER_DESCS=""
for l in $(seq 1 "$LAYERS"); do
  dir=$WORK/layer$l
  mkdir -p "$dir/data/l$l"
  # Deterministic pseudo-random content: a keyed stream per layer, cut into files.
  # (head closes the pipe early: openssl's SIGPIPE is expected, hence the || true.)
  { openssl enc -aes-128-ctr -pass "pass:layer$l" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null || true; } |
    head -c $((FILES * SIZE * 1024)) >"$WORK/stream$l"
  split -b $((SIZE * 1024)) -a 5 -d "$WORK/stream$l" "$dir/data/l$l/f"
  rm "$WORK/stream$l"
  tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$dir" -cf "$WORK/l$l.tar" data
  diff=$(sha "$WORK/l$l.tar")
  gzip -n -1 <"$WORK/l$l.tar" >"$WORK/l$l.tar.gz"
  d=$(sha "$WORK/l$l.tar.gz"); s=$(stat -c %s "$WORK/l$l.tar.gz")
  mv "$WORK/l$l.tar.gz" "$WORK/blobs/sha256/$d"
  rm -rf "$dir" "$WORK/l$l.tar"
  DIFFS="$DIFFS${DIFFS:+,}\"sha256:$diff\""
  LAYER_DESCS="$LAYER_DESCS${LAYER_DESCS:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$s}"
done
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/true"]},"rootfs":{"type":"layers","diff_ids":['"$DIFFS"']}}' >"$WORK/config.json"
c=$(sha "$WORK/config.json"); cs=$(stat -c %s "$WORK/config.json"); cp "$WORK/config.json" "$WORK/blobs/sha256/$c"
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$c"'","size":'"$cs"'},"layers":['"$LAYER_DESCS"']}' >"$WORK/manifest.json"
m=$(sha "$WORK/manifest.json"); ms=$(stat -c %s "$WORK/manifest.json"); cp "$WORK/manifest.json" "$WORK/blobs/sha256/$m"
printf '%s' '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$m"'","size":'"$ms"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"big"}}]}' >"$WORK/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$WORK/oci-layout"
tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$WORK" -cf "$OUT/big.oci.tar" oci-layout index.json blobs
echo "$OUT/big.oci.tar"
