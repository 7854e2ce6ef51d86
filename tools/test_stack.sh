#!/usr/bin/env bash
# Build tempsoft against another torch / triton pair and run tests with it, isolated from the
# checkout: a venv and a copy of the tracked files under $STACK_ROOT/NAME (default
# .ci-stacks/NAME), so the checkout's own .venv and in-tree extension are left alone.
#
# Usage: tools/test_stack.sh NAME TORCH_SPEC TRITON_SPEC [pytest arguments...]
#   e.g. tools/test_stack.sh gpu-machine torch==2.11.0 triton==3.6.0 tests
# Without pytest arguments the whole suite runs (`tests`).
# Environment: PYTHON (the interpreter for a new venv, default python3), STACK_PIP_EXTRA
#   (more requirement specifiers for the same resolver call, e.g. "numpy<2.4"), STACK_ROOT,
#   MAX_JOBS (default 2).
#
# The extension is built for the CPU only unless TEMPSOFT_WITH_CUDA=1 (these are CPU test
# runs; with a CUDA torch and nvcc, TEMPSOFT_WITH_CUDA=1 also compiles the CUDA bindings
# against that torch's headers, which tools/check_cuda.sh cannot). The venv is reused when
# it already holds the requested versions; the copy is refreshed on every run. Exit status:
# pytest's (5, "no tests collected", is passed through for the caller to judge).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,16p' "$0"
  exit 2
fi
name="$1" torch_spec="$2" triton_spec="$3"
shift 3
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${STACK_ROOT:-$repo/.ci-stacks}/$name"
venv="$root/venv"
src="$root/src"
mkdir -p "$root"
start=$SECONDS
log() { echo "[stack $name $((SECONDS - start))s] $*"; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)
# shellcheck disable=SC2206
extra=(${STACK_PIP_EXTRA:-})
log "installing $torch_spec $triton_spec ${extra[*]} and requirements-dev.txt"
# One resolver call, so that the requirements cannot move torch or triton off the pair.
"${pip[@]}" "$torch_spec" "$triton_spec" "${extra[@]}" -r "$repo/requirements-dev.txt"
"$py" -c "import torch, triton; print('[stack] torch', torch.__version__, '| triton', triton.__version__)"

log "copying the tracked files to $src"
rm -rf "$src"
mkdir -p "$src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - \
     --ignore-failed-read 2>/dev/null) | tar -xf - -C "$src"
else
  tar -C "$repo" --exclude=.venv --exclude=.ci-stacks --exclude=build -cf - . | tar -xf - -C "$src"
fi

log "building the extension (TEMPSOFT_WITH_CUDA=${TEMPSOFT_WITH_CUDA:-0})"
(cd "$src" && TEMPSOFT_WITH_CUDA="${TEMPSOFT_WITH_CUDA:-0}" TEMPSOFT_REQUIRE_EXT=1 \
   MAX_JOBS="${MAX_JOBS:-2}" \
   "$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . )

log "pytest ${*:-tests}"
cd "$src"
set +e
"$py" -m pytest -q -p no:cacheprovider "${@:-tests}"
rc=$?
set -e
log "pytest exit status $rc"
exit "$rc"
