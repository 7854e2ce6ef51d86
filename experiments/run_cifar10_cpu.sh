#!/usr/bin/env bash
# The CIFAR-10 CPU study: the cifar10-cpu grid and its three variants, one after the other,
# each its own resumable run under experiments/results/<run>/ with a one-line-per-epoch
# log (run.log). About two and a half hours on two cores; rerun the same command to resume.
#
#   bash experiments/run_cifar10_cpu.sh /path/to/cifar10 [run ...]
#
# DATA: the folder holding cifar-10-python.tar.gz (or cifar-10-batches-py/), or an image tree
# train|test/<class>/ of the same images. Runs (default: all four, in this order):
#   cifar10-cpu       the grid: 7 temperatures x 2 seeds, fixed learning rate, every evaluation
#   cifar10-cpu-lrxT  the SGD learning rate scaled by T (step size held fixed); reduced to
#                     T = 0.1, 1, 3, 10, 100, one seed, clean + ECE + corruptions
#   cifar10-cpu-at    PGD adversarial training at T = 1 and 10; reduced: one seed, 3 epochs,
#                     2 steps of 5/255 (eps 8/255); clean, corruptions, PGD-Linf and the
#                     audit with AutoAttack's APGD-CE + APGD-T
#   cifar10-cpu-vit   vit_tiny at T = 0.1, 1, 10, 100; reduced: one seed, 3 epochs, AdamW
#                     without weight decay on norms, biases, position embedding and class
#                     token; clean + ECE + corruptions
# The reductions keep the whole study inside one working session on two cores; each is a
# flag below, so a longer budget drops it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${1:?usage: run_cifar10_cpu.sh DATA_ROOT [run ...]}"
shift
runs=("$@")
[ "${#runs[@]}" -gt 0 ] || runs=(cifar10-cpu cifar10-cpu-lrxT cifar10-cpu-at cifar10-cpu-vit)
out="${OUT:-$repo/experiments/results}"
export TEMPSOFT_DATA_DIR="$data"   # not a preset setting, so the run's config stays portable
# Run it on an otherwise idle machine: the cells use both cores with two OpenMP threads, and
# anything else running makes them wait for each other (epochs here ran up to 10x slower next
# to a compile job; OMP_WAIT_POLICY=PASSIVE made quiet epochs 4x slower, so it is not set).

args_for() {
  case "$1" in
    cifar10-cpu) ;;
    cifar10-cpu-lrxT) echo "--set train.lr_scaling=\"linear\" --set grid.seeds=[0]
      --set grid.temperatures=[0.1,1.0,3.0,10.0,100.0]
      --set eval.evals=[\"clean\",\"ece\",\"corruption\"]" ;;
    cifar10-cpu-at) echo "--set grid.training=[\"adversarial\"] --set grid.temperatures=[1.0,10.0]
      --set grid.seeds=[0] --set train.epochs=3 --set adversarial.steps=2
      --set adversarial.alpha=0.0196078431372549
      --set eval.evals=[\"clean\",\"ece\",\"corruption\",\"pgd_linf\",\"audit\"]
      --set eval.audit_autoattack=\"custom\"" ;;
    cifar10-cpu-vit) echo "--set grid.models=[\"vit_tiny\"] --set grid.temperatures=[0.1,1.0,10.0,100.0]
      --set grid.seeds=[0] --set models.vit_tiny.optimizer=\"adamw\" --set models.vit_tiny.lr=0.002
      --set models.vit_tiny.weight_decay=0.05 --set models.vit_tiny.decay_all_params=false
      --set models.vit_tiny.epochs=3
      --set models.vit_tiny.amp=\"off\" --set models.vit_tiny.channels_last=false
      --set eval.evals=[\"clean\",\"ece\",\"corruption\"]" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

for run in "${runs[@]}"; do
  mkdir -p "$out/$run"
  echo "[study] $(date -Is) start $run" >> "$out/$run/run.log"
  # shellcheck disable=SC2046
  /usr/bin/time -f "[study] $run: %e s wall, %U s user" \
    python -m tempsoft reproduce --preset cifar10-cpu --out "$out" --run "$run" \
    $(args_for "$run") >> "$out/$run/run.log" 2>&1
  echo "[study] $(date -Is) end $run" >> "$out/$run/run.log"
done
