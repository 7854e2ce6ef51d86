#!/usr/bin/env bash
# The one prepared GPU run (docs: measuring.md): at most ~8 minutes on an H100.
#
#   env          nvidia-smi, compiler, Python package versions
#   wheels       install the wheels carried in .carry/wheels (liger-kernel, torchattacks), if any
#   build        build tempsoft._C with the CUDA kernels for this GPU (build_ext --inplace),
#                and alongside it, on an sm_90+ GPU, an "8.0+PTX" build for the cluster test
#   gpu-tests    tests/test_gpu.py: CUDA and Triton kernels against the reference, bad-target
#                errors, torch.compile, pgd_step_, memory, loss scaling under autocast,
#                deferred checks, CUDA-graph capture, sync debug mode, the 8.0+PTX build on
#                cluster-sized rows (TEMPSOFT_REQUIRE_CUDA=1: no skips)
#   bench-ce     cross-entropy forward+backward, N x V in {4096 x 32000, 8192 x 128256,
#                16384 x 262144}, bf16 and fp32: tempsoft cuda / triton, F.cross_entropy,
#                torch.compile, liger-kernel; time, GB/s, fraction of copy, peak extra memory
#   bench-plans  the CUDA kernel's launch plans (shared memory vs L2 re-read, cluster sizes)
#   bench-pgd    pgd_step_ (cuda, triton) against eager compositions
#   then, while the time budget lasts (skipped, not failed, when it has run out):
#   peer-bench-ce   benchmarks/bench_ce.py --device cuda on the same shapes (its own table)
#   peer-bench-pgd  benchmarks/bench_pgd.py --device cuda (the step, and PGD-10 attacks)
#   bench-train     benchmarks/bench_train.py: ResNet-18 training images/s vs a plain loop
#   suite-tests     the other test files that touch the GPU paths (last: the benchmarks
#                   matter more in a short run than CPU-centred tests repeated on a GPU)
#   summary      the results table and the issue's targets, always printed last
#
# It stops at the first broken step, names it, and still prints the summary of what ran.
# Everything is logged to $OUT/device_check.log (else ./device_out/); benchmark numbers go to
# $OUT/device_bench.json (and the peer scripts' CSV rows to $OUT/peer_*.csv), test results
# to $OUT/gpu_tests.xml.
#
# Usage: bash benchmarks/device_check.sh [--quick] [--no-suite]
#   --quick     fewer benchmark shapes (a smoke run)
#   --no-suite  skip suite-tests
# Environment: BUDGET_S (total seconds, default 480; a device run's limit is 600), PYTHON
#   (default python3), CUDA_HOME and TORCH_CUDA_ARCH_LIST (defaults: found from nvcc and the
#   GPU), MAX_JOBS (default: cores).
set -euo pipefail

quick=""
suite=1
for arg in "$@"; do
  case "$arg" in
    --quick) quick="--quick" ;;
    --no-suite) suite=0 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/device_out}"
mkdir -p "$out"
log="$out/device_check.log"
: >"$log"
py="${PYTHON:-python3}"
budget="${BUDGET_S:-480}"
export PYTHONUNBUFFERED=1
t0=$SECONDS
summary_reserve=15

say() { echo "$@" | tee -a "$log"; }

summary() {
  say ""
  "$py" benchmarks/device_bench.py summary --out "$out" 2>&1 | tee -a "$log" || true
}

# optional_step NAME LIMIT_S COMMAND: a step that is skipped (not failed) when less than a
# minute of the budget is left.
optional_step() {
  local left=$((budget - (SECONDS - t0) - summary_reserve))
  if [ "$left" -lt 60 ]; then
    say ""
    say "=== [$1] skipped: ${left}s of the budget left"
    return 0
  fi
  step "$@"
}

# step NAME LIMIT_S COMMAND: run the command string (a function exported below, or a
# program) in a child bash under a time limit capped by what is left of the budget; on
# failure print the summary and stop, naming the step.
step() {
  local name="$1" limit="$2" cmd="$3"
  local left=$((budget - (SECONDS - t0) - summary_reserve))
  if [ "$left" -lt "$limit" ]; then limit="$left"; fi
  if [ "$limit" -le 0 ]; then
    say "=== [$name] not started: the ${budget}s budget is used up"
    summary
    say "device_check: STOPPED before step '$name' (time budget)"
    exit 1
  fi
  say ""
  say "=== [$name] $(date +%H:%M:%S), limit ${limit}s"
  local start=$SECONDS rc
  set +e
  timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $cmd" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"
    [ "$rc" -eq 124 ] && why="timed out after ${limit}s"
    say "=== [$name] FAILED ($why, $((SECONDS - start))s)"
    summary
    say "device_check: FAILED at step '$name' ($why); log: $log"
    exit 1
  fi
  say "=== [$name] ok ($((SECONDS - start))s)"
}

# ---- env --------------------------------------------------------------------------------
env_info() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,compute_cap,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$py" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
  nproc
}

# ---- wheels -----------------------------------------------------------------------------
install_wheels() {
  shopt -s nullglob
  local wheels=(.carry/wheels/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "no carried wheels (.carry/wheels): liger-kernel and torchattacks rows will be skipped"
    return 0
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/carry-site "${wheels[@]}"
  printf '%s\n' "${wheels[@]##*/}"
}

# ---- build ------------------------------------------------------------------------------
find_cuda_home() {
  local cand nv
  nv="$(command -v nvcc || true)"
  for cand in "${CUDA_HOME:-}" "$([ -n "$nv" ] && dirname "$(dirname "$(readlink -f "$nv")")")" \
              /usr/local/cuda; do
    if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime_api.h" ] && [ -x "$cand/bin/nvcc" ]; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

build() {
  local arch ptx_pid=""
  arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export TEMPSOFT_REQUIRE_EXT=1
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  if [ "${arch%%.*}" -ge 9 ] 2>/dev/null; then
    # The "8.0+PTX" build that tests/test_gpu.py's cluster test runs, alongside this one.
    rm -rf "$ptx_dir"
    mkdir -p "$ptx_dir"
    (MAX_JOBS=$(( MAX_JOBS > 1 ? MAX_JOBS / 2 : 1 )) "$py" -c "
import sys; sys.path.insert(0, 'tests')
from test_gpu import build_ptx_extension
print(build_ptx_extension(sys.argv[1]))" "$ptx_dir" >"$ptx_dir/build.log" 2>&1) &
    ptx_pid=$!
  fi
  "$py" setup.py build_ext --inplace
  "$py" - <<'PY'
import tempsoft
from tempsoft import _dispatch
table = tempsoft.backends()
print("backends:", {k: repr(v) for k, v in table.items()}, "| CPU level:", _dispatch.cpu_level())
assert table["cuda"], f"CUDA backend unavailable after the build: {table['cuda']!r}"
PY
  if [ -n "$ptx_pid" ]; then
    if ! wait "$ptx_pid"; then
      echo "the 8.0+PTX build failed:"
      tail -n 40 "$ptx_dir/build.log"
      return 1
    fi
    tail -n 1 "$ptx_dir/build.log" >"$ptx_dir/lib.path"
    echo "8.0+PTX build: $(cat "$ptx_dir/lib.path")"
  fi
}

gpu_tests() {
  local par=()
  if "$py" -c "import xdist" 2>/dev/null; then par=(-n 4); fi
  if [ -f "$ptx_dir/lib.path" ]; then
    TEMPSOFT_PTX_LIB="$(cat "$ptx_dir/lib.path")"
    export TEMPSOFT_PTX_LIB
  fi
  TEMPSOFT_REQUIRE_CUDA=1 "$py" -m pytest -x -q -p no:cacheprovider "${par[@]}" \
    --junitxml="$out/gpu_tests.xml" tests/test_gpu.py tests/test_cuda_logic.py
}

peer_bench_ce() {
  [ -f benchmarks/bench_ce.py ] || { echo "no benchmarks/bench_ce.py"; return 0; }
  "$py" benchmarks/bench_ce.py --device cuda --shapes 4096x32000,8192x128256,16384x262144 \
    --dtype bf16,fp32 --repeats 10 --out "$out/peer_bench_ce.csv"
}

peer_bench_pgd() {
  [ -f benchmarks/bench_pgd.py ] || { echo "no benchmarks/bench_pgd.py"; return 0; }
  "$py" benchmarks/bench_pgd.py --device cuda --rounds 3
  # bench_pgd.py appends to benchmarks/results/<machine>.csv, which does not come back.
  local f
  for f in benchmarks/results/*.csv; do
    [ -f "$f" ] && cp "$f" "$out/peer_results.csv"
  done
  return 0
}

suite_tests() {
  local files=() f
  for f in tests/test_cross_entropy.py tests/test_pgd_step.py tests/test_triton_ce.py \
           tests/test_attacks.py; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -eq 0 ] && { echo "no suite test files"; return 0; }
  HYPOTHESIS_PROFILE=ci TEMPSOFT_HYPOTHESIS_EXAMPLES="${TEMPSOFT_HYPOTHESIS_EXAMPLES:-40}" \
    "$py" -m pytest -x -q -p no:cacheprovider "${files[@]}"
}

CUDA_HOME="$(find_cuda_home || true)"
ptx_dir="${TMPDIR:-/tmp}/tempsoft-ptx-build"
export CUDA_HOME py out repo ptx_dir
export PYTHONPATH="/tmp/carry-site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export -f env_info install_wheels build gpu_tests peer_bench_ce peer_bench_pgd suite_tests

say "device_check: $(date '+%Y-%m-%d %H:%M:%S %Z'), budget ${budget}s, log $log"
step env 30 env_info
if [ -z "$CUDA_HOME" ]; then
  say "device_check: FAILED at step 'build' (no CUDA toolkit: nvcc and cuda_runtime_api.h not found)"
  exit 1
fi
step wheels 60 install_wheels
step build 240 build
step gpu-tests 200 gpu_tests
step bench-ce 200 "\"\$py\" benchmarks/device_bench.py ce --out \"\$out\" $quick"
step bench-plans 60 "\"\$py\" benchmarks/device_bench.py plans --out \"\$out\" $quick"
step bench-pgd 60 "\"\$py\" benchmarks/device_bench.py pgd --out \"\$out\" $quick"
optional_step peer-bench-ce 150 peer_bench_ce
optional_step peer-bench-pgd 90 peer_bench_pgd
optional_step bench-train 90 "\"\$py\" benchmarks/bench_train.py --device cuda --repeats 3"
if [ "$suite" = 1 ]; then
  optional_step suite-tests 120 suite_tests
fi
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  2>&1 | tee -a "$log" || true
summary
say "device_check: all steps passed in $((SECONDS - t0))s; log: $log"
