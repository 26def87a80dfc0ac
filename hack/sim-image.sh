#!/usr/bin/env bash
# Builds the ollama-sim test image as an OCI image layout and archive, and optionally imports
# it into a containerd namespace.
#
#   hack/sim-image.sh [--binary PATH] [--name REF] [--out DIR] [--import] [--namespace NS]
#
#   --binary PATH   the ollama-sim binary to package (default: build target/debug/ollama-sim)
#   --name REF      image name (default localhost/ollama-sim:dev)
#   --out DIR       where the layout and archive go (default target/images)
#   --import        import the archive into containerd ($CONTAINERD_ADDRESS, see hack/dev-env.sh)
#   --namespace NS  containerd namespace for --import (default ollama-fleet)
#   --env KEY=VALUE bake a variable into the image config (e.g. SIM_VERSION=0.4.1); repeatable
#   --engine SERVER:GGUF  the real engine too (issue 22): llama.cpp's llama-server at
#                   /bin/llama-server and a GGUF at /engine/model.gguf, which the sim then
#                   starts for every loaded model as Ollama starts its runner (SIM_ENGINE);
#                   default name localhost/ollama-engine:dev, archive ollama-engine.oci.tar
#                   (hack/llama-engine.sh builds both)
#
# The image mirrors the real ollama/ollama one: /bin/ollama (the sim) as entrypoint, `serve` as
# command, OLLAMA_HOST=0.0.0.0:11434, plus the C libraries the binary needs. The build is
# deterministic: the same binary gives the same digest (fixed mtimes, owners and order; gzip -n).
# Prints the manifest digest on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BINARY="" NAME="" OUT=$ROOT/target/images IMPORT=0 NS=ollama-fleet EXTRA_ENV="" ENGINE=""
while (($#)); do
  case $1 in
    --binary) BINARY=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --import) IMPORT=1; shift ;;
    --namespace) NS=$2; shift 2 ;;
    --env) [[ $2 == *=* && $2 != *'"'* ]] || { echo "sim-image: --env wants KEY=VALUE" >&2; exit 2; }
           EXTRA_ENV="$EXTRA_ENV,\"$2\""; shift 2 ;;
    --engine) [[ $2 == *:* ]] || { echo "sim-image: --engine wants SERVER:GGUF" >&2; exit 2; }
              ENGINE=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "sim-image: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

"$ROOT/hack/install-deps.sh"   # strip, ldd, tar, gzip; silent when present
if [[ -z $BINARY ]]; then
  (cd "$ROOT" && cargo build --quiet -p ollama-sim --bin ollama-sim)
  BINARY=$ROOT/target/debug/ollama-sim
fi
[[ -x $BINARY ]] || { echo "sim-image: $BINARY is not an executable" >&2; exit 1; }
BASE=ollama-sim
if [[ -n $ENGINE ]]; then
  BASE=ollama-engine
  SERVER=${ENGINE%%:*} GGUF=${ENGINE#*:}
  [[ -x $SERVER && -s $GGUF ]] || { echo "sim-image: --engine $ENGINE: no executable server or no model file" >&2; exit 1; }
  EXTRA_ENV="$EXTRA_ENV,\"SIM_ENGINE=/bin/llama-server\",\"SIM_ENGINE_MODEL=/engine/model.gguf\""
fi
NAME=${NAME:-localhost/$BASE:dev}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs
mkdir -p "$ROOTFS"/{bin,etc,tmp,root,models}
strip -o "$ROOTFS/bin/ollama" "$BINARY"
BINARIES=("$BINARY")
if [[ -n $ENGINE ]]; then
  mkdir -p "$ROOTFS/engine"
  strip -o "$ROOTFS/bin/llama-server" "$SERVER"
  cp "$GGUF" "$ROOTFS/engine/model.gguf"
  BINARIES+=("$SERVER")
fi
# The dynamic loader and libraries, at the paths the binaries ask for.
for lib in $(ldd "${BINARIES[@]}" | grep -v ':$' | grep -o '/[^ ]*' | sort -u); do
  mkdir -p "$ROOTFS$(dirname "$lib")"
  cp -L "$lib" "$ROOTFS$lib"
done
printf 'root:x:0:0:root:/root:/bin/ollama\nnobody:x:65534:65534:nobody:/:/bin/ollama\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"
find "$ROOTFS" -type d -exec chmod 0755 {} +
find "$ROOTFS" -type f -exec chmod 0644 {} +
chmod 0755 "$ROOTFS"/bin/* "$ROOTFS"/lib*/ld-linux* "$ROOTFS"/lib*/*/ld-linux* 2>/dev/null || true
chmod 1777 "$ROOTFS/tmp"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

LAYOUT=$OUT/$BASE
rm -rf "$LAYOUT"
mkdir -p "$LAYOUT/blobs/sha256"
tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$ROOTFS" -cf "$WORK/layer.tar" $(cd "$ROOTFS" && ls)
DIFF_ID=$(sha "$WORK/layer.tar")
gzip -n -6 <"$WORK/layer.tar" >"$WORK/layer.tar.gz"
LAYER=$(sha "$WORK/layer.tar.gz") LAYER_SIZE=$(size "$WORK/layer.tar.gz")
mv "$WORK/layer.tar.gz" "$LAYOUT/blobs/sha256/$LAYER"

blob() { # blob FILE: stores FILE by digest, prints "digest size"
  local d; d=$(sha "$1"); cp "$1" "$LAYOUT/blobs/sha256/$d"; echo "$d $(size "$1")"
}
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","OLLAMA_HOST=0.0.0.0:11434"'"$EXTRA_ENV"'],"Entrypoint":["/bin/ollama"],"Cmd":["serve"],"WorkingDir":"/","ExposedPorts":{"11434/tcp":{}},"Labels":{"org.opencontainers.image.title":"'"$BASE"'"}},"rootfs":{"type":"layers","diff_ids":["sha256:'"$DIFF_ID"'"]},"history":[{"created_by":"hack/sim-image.sh"}]}' >"$WORK/config.json"
read -r CONFIG CONFIG_SIZE < <(blob "$WORK/config.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$CONFIG"'","size":'"$CONFIG_SIZE"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$LAYER"'","size":'"$LAYER_SIZE"'}]}' >"$WORK/manifest.json"
read -r MANIFEST MANIFEST_SIZE < <(blob "$WORK/manifest.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$MANIFEST"'","size":'"$MANIFEST_SIZE"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"'"$NAME"'","org.opencontainers.image.ref.name":"'"${NAME##*:}"'"}}]}' >"$LAYOUT/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"
tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$LAYOUT" -cf "$OUT/$BASE.oci.tar" oci-layout index.json blobs
echo "sim-image: $NAME sha256:$MANIFEST ($(du -h "$OUT/$BASE.oci.tar" | cut -f1)) in $OUT/$BASE.oci.tar" >&2

if ((IMPORT)); then
  ctr -n "$NS" images import "$OUT/$BASE.oci.tar" >/dev/null
  echo "sim-image: imported into namespace $NS of ${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}" >&2
fi
echo "sha256:$MANIFEST"
