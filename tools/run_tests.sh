#!/usr/bin/env bash
# Set up (venv, install, build) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_env.sh"
cd "$repo"
exec python -m pytest -q tests "$@"
