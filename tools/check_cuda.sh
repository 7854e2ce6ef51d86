#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, with the flags the real
# build uses (setup.py's nvcc flags plus torch's COMMON_NVCC_FLAGS), on a machine without a
# GPU and without torch. The .cu files include no torch header, so nvcc alone suffices.
#
# A syntax or type error stops nvcc's front end within seconds; a clean file takes longer
# (cicc + ptxas for both architectures). Files compile in parallel, architectures inside one
# nvcc call (--threads).
#
# Usage: tools/check_cuda.sh [--report]
#   --report   also print each kernel's registers, stack and spills (ptxas -v) and warn when
#              a kernel spills to local memory.
# Environment: NVCC (default nvcc), CUDA_ARCHS (default "80 90"), CUDA_STD (default c++17,
#   the oldest standard a supported torch compiles extensions with), JOBS (default: cores).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-nvcc}"
archs="${CUDA_ARCHS:-80 90}"
std="${CUDA_STD:-c++17}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
report=0
for arg in "$@"; do
  case "$arg" in
    --report) report=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "check_cuda.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "check_cuda.sh: $nvcc_bin not found" >&2
  exit 2
fi

# setup.py: extra_compile_args["nvcc"]; torch.utils.cpp_extension: COMMON_NVCC_FLAGS, -fPIC.
flags=(-std="$std" -O3 -DTEMPSOFT_WITH_CUDA -lineinfo
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr -Xcompiler -fPIC --threads 0)
for a in $archs; do flags+=(-gencode "arch=compute_$a,code=sm_$a"); done
[ "$report" = 1 ] && flags+=(-Xptxas -v)

shopt -s nullglob
sources=("$repo"/csrc/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda.sh: no .cu files under csrc/cuda"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "check_cuda.sh: $("$nvcc_bin" --version | tail -n 2 | head -n 1)"
echo "check_cuda.sh: ${#sources[@]} file(s), sm_{${archs// /,}}, -std=$std, $jobs job(s)"

compile_one() {  # $1 = source; writes $work/<name>.log and .rc
  local src="$1" name
  name="$(basename "$src" .cu)"
  local start=$SECONDS
  if "$nvcc_bin" -c "${flags[@]}" "$src" -o "$work/$name.o" >"$work/$name.log" 2>&1; then
    echo 0 >"$work/$name.rc"
  else
    echo 1 >"$work/$name.rc"
  fi
  echo "$((SECONDS - start))" >"$work/$name.time"
}

running=0
for src in "${sources[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  rc="$(cat "$work/$name.rc" 2>/dev/null || echo 1)"
  secs="$(cat "$work/$name.time" 2>/dev/null || echo '?')"
  if [ "$rc" = 0 ]; then
    echo "  ok    csrc/cuda/$name.cu (${secs}s)"
    # nvcc prints warnings even on success; show them so they get fixed.
    grep -E "warning" "$work/$name.log" | grep -v "ptxas info" | sed 's/^/        /' || true
  else
    echo "  FAIL  csrc/cuda/$name.cu (${secs}s)"
    sed 's/^/        /' "$work/$name.log"
    failed=1
  fi
  if [ "$report" = 1 ] && [ "$rc" = 0 ]; then
    # ptxas -v: "Compiling entry function 'X' for 'sm_NN'", then stack/spill and register lines.
    awk '
      /Compiling entry function/ { fn = $0; sub(/.*function .\x27?/, "", fn);
                                   sub(/\x27? for .*/, "", fn); arch = $NF; gsub(/\x27/, "", arch) }
      /spill stores/ { spill = $0; sub(/^[ \t]+/, "", spill) }
      /Used [0-9]+ registers/ { regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs);
                                printf "        %-7s %3s regs  %s  %s\n", arch, regs, spill, fn
                                if (spill !~ /^0 bytes stack/) warn = 1 }
      END { if (warn) print "        warning: some kernels use local memory (see above)" }
    ' "$work/$name.log" | { if command -v cu++filt >/dev/null 2>&1; then cu++filt; else cat; fi; }
  fi
done

if [ "$failed" != 0 ]; then
  echo "check_cuda.sh: FAILED"
  exit 1
fi
echo "check_cuda.sh: all CUDA sources compile"
