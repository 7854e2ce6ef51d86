"""The ``tempsoft`` command: train | eval | attack | reproduce | report | bench | demo.

    tempsoft demo                                   # the digits study, a few minutes on a CPU
    tempsoft reproduce --list                       # the presets shipped with tempsoft
    tempsoft reproduce --preset cifar10             # a study (tempsoft/study/presets/)
    tempsoft reproduce --preset paper --executor ray          # cells as Ray tasks
    tempsoft reproduce --preset paper --executor slurm --partition gpu --gpus-per-cell 1
    tempsoft report merge host-a/paper host-b/paper --out results/paper
    tempsoft train --dataset digits --model small_cnn --T 2 --epochs 10 --out results/t2
    tempsoft eval results/t2/model.pt --evals clean,ece,corruption,pgd_linf
    tempsoft attack results/t2/model.pt --norm linf --eps 0.1 --steps 20 --audit
    tempsoft bench train -- --batches 3             # benchmarks/bench_train.py
    torchrun --nproc_per_node=2 -m tempsoft train ...   # DistributedDataParallel

Bad input (unknown names, T <= 0, malformed presets) prints one line starting with
"tempsoft: error:" and exits with status 2 (TEMPSOFT_DEBUG=1 re-raises, with the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

EXIT_USAGE = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
    return value


def _temperature_or_train(text: str) -> Optional[float]:
    return None if text == "train" else _positive_float(text)


def _evals(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


# ======================================================================================
# train
# ======================================================================================
def _add_train(sub) -> None:
    from tempsoft.train import AMP_MODES, LR_SCALINGS, OPTIMIZERS, SCHEDULES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model at temperature T",
                       description="Train at softmax temperature T (standard or PGD "
                       "adversarial). Writes OUT/checkpoint.pt every epoch (a rerun resumes "
                       "it), OUT/model.pt and OUT/history.json.")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--model", default=d.model)
    # T is parsed as a plain float so that T <= 0 reaches TrainConfig's clear error message.
    p.add_argument("--T", type=float, default=d.T, help="softmax temperature (> 0)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default=d.lr_scaling,
                   help="linear: SGD lr x T and weight decay / T (no-op for AdamW)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--adversarial", action="store_true",
                   help="PGD-Linf adversarial training (Madry et al.)")
    p.add_argument("--adv-eps", type=float, default=d.adv_eps)
    p.add_argument("--adv-alpha", type=float, default=d.adv_alpha)
    p.add_argument("--adv-steps", type=int, default=d.adv_steps)
    p.add_argument("--adv-T", type=_temperature_or_train, default=None,
                   help='temperature of the inner attack: "train" (default) or a number')
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp)
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None,
                   help="run folder (default results/train/<dataset>-<model>-T<T>-seed<seed>)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from tempsoft.train import TrainConfig, distributed_info, save_model, train

    out = Path(args.out or f"results/train/{args.dataset}-{args.model}-T{args.T:g}-"
               f"seed{args.seed}{'-adv' if args.adversarial else ''}")
    config = TrainConfig(
        dataset=args.dataset, model=args.model, T=args.T, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, lr_scaling=args.lr_scaling,
        label_smoothing=args.label_smoothing, augment=not args.no_augment,
        adversarial=args.adversarial, adv_eps=args.adv_eps, adv_alpha=args.adv_alpha,
        adv_steps=args.adv_steps, adv_T=args.adv_T, seed=args.seed, device=args.device,
        amp=args.amp, channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
        compile=args.compile, data_root=args.data_root, download=args.download,
        max_batches=args.max_batches, progress=not args.no_progress,
        checkpoint_dir=str(out))
    config.validate()
    from tempsoft.data import load_dataset

    train_set = load_dataset(config.dataset, root=config.data_root, split="train",
                             download=config.download)
    result = train(config, train_set=train_set, on_epoch_end=_print_epoch
                   if distributed_info().is_main else None)
    if distributed_info().is_main:
        save_model(out / "model.pt", result, train_set)
        (out / "history.json").write_text(json.dumps(result.history, indent=1))
        last = result.final
        resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
        print(f"trained {config.model} on {config.dataset} at T={config.T:g}: loss "
              f"{last['loss']:.4f}, train acc {last['train_acc']:.4f} "
              f"({result.seconds:.1f}s{resumed}) -> {out / 'model.pt'}")
    return 0


def _print_epoch(epoch: int, record: dict) -> None:
    print(f"epoch {record['epoch']}: loss {record['loss']:.4f} acc {record['train_acc']:.4f} "
          f"{record['images_per_s']:.0f} img/s | |dL/dz| {record['grad_logits_norm']:.4g} "
          f"|dL/dh| {record['grad_features_norm']:.4g} wrong-class entropy "
          f"{record['wrong_class_entropy_norm']:.3f}", flush=True)


# ======================================================================================
# eval and attack
# ======================================================================================
def _add_eval_settings(p) -> None:
    from tempsoft.robustness.evaluate import EvalSettings

    d = EvalSettings()
    p.add_argument("--T", type=float, default=None,
                   help="temperature for probabilities (default: the training T)")
    p.add_argument("--linf-eps", type=_positive_float, default=d.pgd_linf_eps)
    p.add_argument("--linf-alpha", type=_positive_float, default=d.pgd_linf_alpha)
    p.add_argument("--l2-eps", type=_positive_float, default=d.pgd_l2_eps)
    p.add_argument("--l2-alpha", type=_positive_float, default=d.pgd_l2_alpha)
    p.add_argument("--steps", type=int, default=d.pgd_steps)
    p.add_argument("--restarts", type=int, default=d.pgd_restarts)
    p.add_argument("--pgd-T", type=_temperature_or_train, default=d.pgd_T,
                   help='temperature of the PGD loss: a number (default 1) or "train"')
    p.add_argument("--examples", type=int, default=None,
                   help="attack / audit this many test examples (default: all, audit 1000)")
    p.add_argument("--apgd-steps", type=int, default=d.audit_apgd_steps,
                   help="APGD-DLR iterations in the audit")
    p.add_argument("--autoattack", choices=("standard", "custom", "off"),
                   default=d.audit_autoattack,
                   help="the reference AutoAttack in the audit: standard (default), custom "
                   "(APGD-CE + APGD-T, quicker on a CPU) or off")
    p.add_argument("--square-queries", type=int, default=d.audit_square_queries,
                   help="queries of the audit's Square Attack (0: off)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument("--released-c-root", default=None,
                   help="a folder holding the released CIFAR-10-C / CIFAR-100-C / "
                   "Tiny-ImageNet-C (evaluation released_c)")
    p.add_argument("--released-p-root", default=None,
                   help="likewise for CIFAR-10-P / CIFAR-100-P / Tiny-ImageNet-P "
                   "(evaluation released_p)")
    p.add_argument("--cifar101-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")


def _add_eval(sub) -> None:
    from tempsoft.robustness.evaluate import EVALS

    p = sub.add_parser("eval", help="evaluate a trained model",
                       description=f"Evaluate a model.pt / checkpoint.pt. Evaluations: "
                       f"{', '.join(EVALS)}. The health report (did it train, did it "
                       "collapse) always runs.")
    p.add_argument("model", help="a model.pt or checkpoint.pt written by tempsoft train")
    p.add_argument("--evals", type=_evals, default=["clean", "ece"],
                   help="comma-separated (default clean,ece)")
    _add_eval_settings(p)
    p.set_defaults(func=_cmd_eval)


def _add_attack(sub) -> None:
    p = sub.add_parser("attack", help="PGD (and the gradient-masking audit) on a model",
                       description="Untargeted PGD on the test set of the model's dataset; "
                       "--audit adds the gradient-masking audit.")
    p.add_argument("model")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=_positive_float, default=None,
                   help="radius (default 8/255 for linf, 0.5 for l2)")
    p.add_argument("--alpha", type=_positive_float, default=None, help="step size")
    p.add_argument("--audit", action="store_true")
    _add_eval_settings(p)
    p.set_defaults(func=_cmd_attack)


def _settings_from(args):
    from tempsoft.robustness.evaluate import EvalSettings

    fields = dict(pgd_linf_eps=args.linf_eps, pgd_linf_alpha=args.linf_alpha,
                  pgd_l2_eps=args.l2_eps, pgd_l2_alpha=args.l2_alpha, pgd_steps=args.steps,
                  pgd_restarts=args.restarts, pgd_T=args.pgd_T, batch_size=args.batch_size,
                  device=args.device, released_c_root=args.released_c_root,
                  released_p_root=args.released_p_root,
                  cifar101_root=args.cifar101_root, seed=args.seed, audit_steps=args.steps,
                  audit_apgd_steps=args.apgd_steps, audit_autoattack=args.autoattack,
                  audit_square_queries=args.square_queries)
    if args.examples is not None:
        fields.update(pgd_examples=args.examples, audit_examples=args.examples)
    return EvalSettings(**fields).validate()


def _load_for_eval(args):
    from tempsoft.data import load_dataset
    from tempsoft.train import load_trained

    path = Path(args.model)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    model, meta = load_trained(path, device="cpu")
    dataset = meta["trajectory"]["dataset"]
    test_set = load_dataset(dataset, root=args.data_root, split="test")
    train_set = load_dataset(dataset, root=args.data_root, split="train")
    train_T = float(meta["trajectory"]["T"])
    return model, meta, test_set, train_set, train_T


def _cmd_eval(args) -> int:
    from tempsoft.robustness.evaluate import evaluate

    model, meta, test_set, train_set, train_T = _load_for_eval(args)
    T = args.T if args.T is not None else train_T
    metrics = evaluate(model, test_set, args.evals, T=T, train_T=train_T, train_set=train_set,
                       settings=_settings_from(args), log=print)
    _print_metrics(metrics, f"{meta['trajectory']['model']} trained at T={train_T:g} on "
                   f"{test_set.name}")
    _maybe_write_json(args.json, metrics)
    return 0


def _cmd_attack(args) -> int:
    from tempsoft.robustness.evaluate import evaluate

    if args.eps is not None:
        setattr(args, f"{args.norm}_eps", args.eps)
    if args.alpha is not None:
        setattr(args, f"{args.norm}_alpha", args.alpha)
    model, meta, test_set, train_set, train_T = _load_for_eval(args)
    evals = ["clean", f"pgd_{args.norm}"] + (["audit"] if args.audit else [])
    T = args.T if args.T is not None else train_T
    metrics = evaluate(model, test_set, evals, T=T, train_T=train_T, train_set=train_set,
                       settings=_settings_from(args), log=print)
    _print_metrics(metrics, f"PGD-{args.norm} on {meta['trajectory']['model']} trained at "
                   f"T={train_T:g}")
    _maybe_write_json(args.json, metrics)
    return 0


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    print(title)
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:<34} {value:.4f}")
        elif isinstance(value, list):
            print(f"  {key:<34} {[round(v, 3) if isinstance(v, float) else v for v in value]}")
        else:
            print(f"  {key:<34} {value}")


def _maybe_write_json(path: Optional[str], metrics: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(metrics, indent=1, default=str))


# ======================================================================================
# reproduce, demo, bench
# ======================================================================================
def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run a study from a preset",
                       description="Run every unfinished cell of a preset (a name from "
                       "--list, or a .toml path) and write <out>/<run>/results.csv, "
                       "results.md, claims.md and PNG plots. Rerunning skips finished cells; "
                       "a cell in flight resumes from its last epoch checkpoint.")
    p.add_argument("--preset", required=False, help="preset name or .toml path")
    p.add_argument("--run", default=None, help="run folder name (default: the preset name)")
    p.add_argument("--out", default="results", help="parent folder of the run (default "
                   "results)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a preset value, e.g. "
                   "--set train.epochs=2 --set grid.temperatures=[0.5,2]")
    p.add_argument("--device", default=None, help="force a device (cpu, cuda)")
    p.add_argument("--list", action="store_true", help="list the presets, their cells and "
                   "descriptions")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, list the cells and project the cost; run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md, claims.md and the plots from results.csv")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("executors (where the cells run)")
    g.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                   help="local (default: here, one cell after another), ray (Ray tasks on "
                   "this machine or --address's cluster), slurm (a job array via submitit)")
    g.add_argument("--address", default=None, help="ray: join this Ray cluster "
                   "(e.g. auto, or ray://host:10001); default: start Ray on this machine")
    g.add_argument("--cpus-per-cell", type=float, default=None,
                   help="ray/slurm: CPUs a cell needs (default: the preset's run.threads)")
    g.add_argument("--gpus-per-cell", type=float, default=None,
                   help="ray/slurm: GPUs a cell needs (default 1 when cells run on CUDA)")
    g.add_argument("--max-retries", type=int, default=None,
                   help="ray/slurm: how often a cell whose worker died is retried (default 2)")
    g.add_argument("--cells-per-job", type=int, default=None,
                   help="slurm: cells per array task (default 1)")
    g.add_argument("--partition", default=None, help="slurm: the partition")
    g.add_argument("--timeout-min", type=int, default=None,
                   help="slurm: time limit of an array task in minutes (default 1440)")
    g.add_argument("--cluster", default=None,
                   help="slurm: submitit's cluster (default: slurm when sbatch is found; "
                   "local: the same jobs as local processes)")
    p.set_defaults(func=_cmd_reproduce)


def _executor_options(args) -> dict[str, Any]:
    options = {"ray": {"address": args.address, "cpus_per_cell": args.cpus_per_cell,
                       "gpus_per_cell": args.gpus_per_cell, "max_retries": args.max_retries},
               "slurm": {"cpus_per_cell": args.cpus_per_cell,
                         "gpus_per_cell": None if args.gpus_per_cell is None
                         else int(args.gpus_per_cell), "max_retries": args.max_retries,
                         "cells_per_job": args.cells_per_job, "partition": args.partition,
                         "timeout_min": args.timeout_min, "cluster": args.cluster},
               "local": {}}[args.executor]
    given = {k for k, v in vars(args).items() if v is not None and k in {
        "address", "cpus_per_cell", "gpus_per_cell", "max_retries", "cells_per_job",
        "partition", "timeout_min", "cluster"}}
    stray = sorted(given - set(options))
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} do(es) not apply to --executor {args.executor}")
    return options


def _cmd_reproduce(args) -> int:
    from tempsoft.study import available_presets, cells, load_preset, project, reproduce
    from tempsoft.study import write_report

    if args.list:
        for name in available_presets():
            preset = load_preset(name)
            print(f"{name:<12} {len(cells(preset)):>4} cells  {preset.description}")
        return 0
    if not args.preset:
        raise ValueError(f"reproduce needs --preset NAME; available: {available_presets()}")
    preset = load_preset(args.preset, args.overrides)
    options = _executor_options(args)
    if args.dry_run:
        for cell in cells(preset):
            print(cell.id)
        print(f"{len(cells(preset))} cells")
        print(project(preset))
        return 0
    if args.report_only:
        run_dir = Path(args.out) / (args.run or preset.name)
        for path in write_report(run_dir):
            print(path)
        return 0
    # Progress bars only on a terminal: in a log file they would be carriage-return noise,
    # and the runner writes one line per epoch and per evaluation anyway.
    summary = reproduce(preset, out_dir=args.out, run_name=args.run,
                        progress=not args.no_progress and sys.stdout.isatty(),
                        device=args.device, executor=args.executor, executor_options=options)
    print(f"[tempsoft] done in {summary.seconds:.1f}s: {summary.cells_run} cells run, "
          f"{summary.cells_skipped} skipped -> {summary.run_dir}/results.md")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the demo study (tempsoft reproduce --preset demo)")
    p.add_argument("--out", default="results")
    p.add_argument("--run", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    args.preset, args.overrides, args.device, args.executor = "demo", [], None, "local"
    args.list = args.dry_run = args.report_only = False
    for name in ("address", "cpus_per_cell", "gpus_per_cell", "max_retries", "cells_per_job",
                 "partition", "timeout_min", "cluster"):
        setattr(args, name, None)
    return _cmd_reproduce(args)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rewrite a run's reports, or summarize several runs",
                       description="tempsoft report rewrite RUN_DIR: results.md, claims.md and "
                       "the plots again from results.csv. tempsoft report merge RUN_DIR... "
                       "--out DIR: runs of one study from several machines as one run "
                       "(refused when their settings or a shared cell's config differ). "
                       "tempsoft report summary RUN_DIR... --out FILE: every claim's verdict "
                       "in every run, one table.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    rewrite = actions.add_parser("rewrite", help="rewrite a run's results.md, claims.md, plots")
    rewrite.add_argument("run_dir")
    rewrite.set_defaults(func=_cmd_report_rewrite)
    merge = actions.add_parser("merge", help="combine runs of one study made on several "
                               "machines into one results.csv and report")
    merge.add_argument("run_dirs", nargs="+")
    merge.add_argument("--out", required=True, help="a new folder for the merged run")
    merge.set_defaults(func=_cmd_report_merge)
    summary = actions.add_parser("summary", help="claim verdicts across runs")
    summary.add_argument("run_dirs", nargs="+")
    summary.add_argument("--out", required=True, help="the markdown file to write")
    summary.set_defaults(func=_cmd_report_summary)


def _cmd_report_merge(args) -> int:
    from tempsoft.study import merge_runs

    out = merge_runs(args.run_dirs, args.out)
    print(f"{out}/results.csv, results.md, claims.md")
    return 0


def _cmd_report_rewrite(args) -> int:
    from tempsoft.study import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "results.csv").is_file():
        raise FileNotFoundError(f"no results.csv in {run_dir}")
    for path in write_report(run_dir):
        print(path)
    return 0


def _cmd_report_summary(args) -> int:
    from tempsoft.study import read_results
    from tempsoft.study.claims import write_summary

    runs = {}
    for folder in map(Path, args.run_dirs):
        if not (folder / "results.csv").is_file():
            raise FileNotFoundError(f"no results.csv in {folder}")
        runs[folder.name] = read_results(folder / "results.csv")
    print(write_summary(args.out, runs))
    return 0


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                       description="Run benchmarks/bench_NAME.py of the source tree with the "
                       "remaining arguments, e.g. `tempsoft bench train -- --batches 3`.")
    p.add_argument("name", nargs="?", default="train", help="benchmark name (default train)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    folder = benchmarks_dir()
    script = folder / f"bench_{args.name}.py"
    if not script.is_file():
        found = sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py"))
        raise ValueError(f"unknown benchmark {args.name!r}; available in {folder}: {found} "
                         "(benchmarks ship with the source tree, not the wheel)")
    rest = [a for a in args.args if a != "--"]
    saved = sys.argv
    sys.argv = [str(script)] + rest
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


# ======================================================================================
# main
# ======================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tempsoft", description="Softmax temperature: training, robustness evaluation "
        "and the paper's experiments (arXiv:2502.20604).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: torch's choice); results "
                        "are bitwise reproducible only at the same thread count")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_train, _add_eval, _add_attack, _add_reproduce, _add_report, _add_bench,
                _add_demo):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input).

    Example:
        >>> main(["reproduce", "--preset", "demo", "--dry-run"])
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except (ValueError, TypeError, IndexError, FileNotFoundError) as exc:
        if os.environ.get("TEMPSOFT_DEBUG"):
            raise
        print(f"tempsoft: error: {exc}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tempsoft: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
