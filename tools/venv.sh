#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating and filling it first
# when needed. Usage: bash tools/venv.sh ssni demo   |   bash tools/venv.sh python -m pytest -q
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.ssni-installed"
want="$(cat "$root/setup.py" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[ssni] creating virtual environment in $venv" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[ssni] installing ssni and its dependencies into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # The standard torch + torchvision pair from the package index (the CUDA build runs on CPU too).
  "$venv/bin/python" -m pip install --quiet torch torchvision 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -m pip install --quiet -e "$root[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -c "import ssni, torch, torchvision, timm" || { echo "[ssni] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
