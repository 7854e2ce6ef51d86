#!/usr/bin/env bash
# Set up a virtual environment for tempsoft and build the native extension in it.
#   - creates $TEMPSOFT_VENV (default .venv) once, with $PYTHON (default python3);
#   - installs torch ($TORCH_SPEC, default torch==2.13.0) unless the venv already has one,
#     then the rest of requirements-dev.txt;
#   - builds tempsoft._C (the op schemas, plus CUDA kernels when torch has CUDA) and the C++
#     CPU kernels once per SIMD level, with an editable install, so later edits to Python
#     files need no reinstall.
# Source it (`. tools/setup_env.sh`) to stay in the venv, or let the run_* scripts call it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TEMPSOFT_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "[setup] installing test and demo dependencies"
python -m pip install -q --disable-pip-version-check -r "$repo/requirements-dev.txt"
echo "[setup] building the native extension (a few minutes the first time)"
( cd "$repo" && MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e . )
python - <<'PY'
import tempsoft
from tempsoft import _dispatch
table = tempsoft.backends()
print("[setup] backends: " + ", ".join(f"{k}={v!r}" for k, v in table.items())
      + f"; CPU kernels: {_dispatch.cpu_level()}")
PY
