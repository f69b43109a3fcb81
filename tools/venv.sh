#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating and filling it first
# when needed. Usage: bash tools/venv.sh ssni demo   |   bash tools/venv.sh python -m pytest -q
# SSNI_EXTRAS="autoattack robustbench" (spaces or commas) installs those extras beside `test`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.ssni-installed"
extras="test"
for extra in $(printf '%s' "${SSNI_EXTRAS:-}" | tr ',' ' '); do
  if ! [[ "$extra" =~ ^[A-Za-z0-9_-]+$ ]]; then
    echo "[ssni] SSNI_EXTRAS: bad extra name '$extra' (expected names from setup.py's extras_require, e.g. autoattack)" >&2
    exit 2
  fi
  case ",$extras," in *",$extra,"*) ;; *) extras="$extras,$extra" ;; esac
done
# the stamp covers setup.py and the extras installed, so asking for another extra installs it
want="$({ cat "$root/setup.py"; echo "extras=$extras"; } | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[ssni] creating virtual environment in $venv" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[ssni] installing ssni and its dependencies into $venv (first run takes a few minutes)" >&2
  # torch with its CUDA libraries fills about 6 GB, and pip holds the downloaded wheels (about
  # 3 GB) until it has installed them: say so up front instead of failing half-way through.
  free_kb="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 10000000 ]; then
    echo "[ssni] warning: $((free_kb / 1048576)) GB free under $root; the install needs about 10 GB (torch + CUDA libraries)" >&2
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # The standard torch + torchvision pair from the package index (the CUDA build runs on CPU too).
  "$venv/bin/python" -m pip install --quiet torch torchvision 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -m pip install --quiet -e "$root[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  if [ "$extras" != "test" ]; then
    # a second step, so that the extras' files are written last: torchattacks (in `test`) installs an old
    # copy of robustbench's modules into robustbench's own folder
    echo "[ssni] installing the extras: ${extras#test,}" >&2
    "$venv/bin/python" -m pip install --quiet -e "$root[$extras]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  "$venv/bin/python" -c "import ssni, torch, torchvision, timm" || { echo "[ssni] install failed (see pip's message above)" >&2; exit 1; }
  if [[ ",$extras," == *",robustbench,"* ]]; then
    "$venv/bin/python" -c "from ssni.models.robustbench_zoo import import_robustbench; import_robustbench()" \
      || { echo "[ssni] the robustbench extra does not import (see above)" >&2; exit 1; }
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
