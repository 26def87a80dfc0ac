#!/usr/bin/env bash
# The official Ollama Python client (PyPI `ollama`, pinned) and OpenAI's (PyPI `openai`, pinned:
# the /v1 routes' refusals as OpenAI's clients read them) in a virtualenv of the project's
# (default target/pyenv, or $OLLAMA_FLEET_PYENV); made or refreshed when missing. Prints the
# venv's python on stdout, e.g.: OLLAMA_FLEET_PYTHON=$(hack/python-client.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OLLAMA_FLEET_PYENV:-$ROOT/target/pyenv}
VERSION=0.6.3
OPENAI_VERSION=1.109.1
"$ROOT/hack/install-deps.sh"
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('ollama') != '$VERSION' or m.version('openai') != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "python-client: installing ollama==$VERSION and openai==$OPENAI_VERSION from PyPI into $VENV" >&2
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  # The system's trust store (a network that inspects TLS adds its CA there).
  cert=()
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cert=(--cert /etc/ssl/certs/ca-certificates.crt)
  "$VENV/bin/pip" install -q --disable-pip-version-check "${cert[@]}" "ollama==$VERSION" "openai==$OPENAI_VERSION" >&2
fi
echo "$VENV/bin/python"
