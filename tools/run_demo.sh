#!/usr/bin/env bash
# Set up (venv, install, build) and run the main job: the demo study on the bundled digits
# (small CNN trained across temperatures; clean, corruption, PGD and gradient-masking audit),
# writing results/demo/{results.csv,results.md,*.png}. Extra arguments go to `reproduce`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_env.sh"
cd "$repo"
exec python -m tempsoft reproduce --preset demo "$@"
