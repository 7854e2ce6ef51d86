"""Presets (validation, clear errors), the cell grid, and a reduced demo study end to end
(results.csv, results.md, plots, skipping finished cells, resuming an interrupted cell)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tempsoft import study as rp
from tempsoft.study import cell as cell_module
from tempsoft.study import (DEFAULT_TEMPERATURES, PresetError, cells, load_preset,
                                parse_override, read_results, reproduce, validate_preset)

# A reduced demo: the real demo preset with fewer temperatures, epochs and attack steps.
QUICK = ["grid.temperatures=[0.5, 5.0]", "grid.seeds=[0, 1]", "train.epochs=2",
         "train.max_batches=6", "eval.audit_examples=48", "eval.audit_apgd_steps=4",
         "eval.audit_steps=3", "eval.pgd_steps=3", "eval.pgd_examples=48",
         'eval.corruptions=["gaussian_noise", "contrast"]', "eval.severities=[1, 5]"]


# Tiny 8x8 models: one thread is as fast and does not stall on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def minimal(**sections) -> dict:
    raw = {"name": "t", "grid": {"datasets": ["digits"], "models": ["small_cnn"],
                                 "temperatures": [1.0], "seeds": [0]},
           "train": {"epochs": 1}, "eval": {"evals": ["clean"]}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


# --------------------------------------------------------------------------------------
# Shipped presets and defaults
# --------------------------------------------------------------------------------------
def test_default_temperatures_are_log_spaced_from_0p1_to_100_with_1():
    temps = list(DEFAULT_TEMPERATURES)
    assert len(temps) >= 8 and 1.0 in temps
    assert min(temps) == pytest.approx(0.1) and max(temps) == pytest.approx(100.0)
    logs = [math.log10(t) for t in temps]
    gaps = [b - a for a, b in zip(logs, logs[1:])]
    assert all(0.1 < g < 0.5 for g in gaps), gaps   # roughly even steps on a log axis


@pytest.mark.parametrize("name, n_cells", [("demo", 14), ("cifar10", 20), ("paper", 720),
                                           ("cifar10-gpu-short", 7)])
def test_shipped_presets_load(name, n_cells):
    preset = load_preset(name)
    assert len(cells(preset)) == n_cells
    assert preset.train.get("lr_scaling") in ("none", "linear")   # every preset states it


def test_demo_preset_is_a_cpu_sweep_with_corruption_pgd_and_audit():
    preset = load_preset("demo")
    assert preset.datasets == ["digits"] and preset.train["device"] == "cpu"
    assert {"corruption", "pgd_linf", "audit"} <= set(preset.eval["evals"])
    assert 1.0 in preset.temperatures and len(preset.temperatures) >= 5


def test_gpu_presets_use_the_paper_defaults():
    preset = load_preset("cifar10")
    assert preset.temperatures == list(DEFAULT_TEMPERATURES)
    assert preset.models == ["resnet18", "vit"]
    assert preset.eval["pgd_linf_eps"] == pytest.approx(8 / 255)
    assert preset.adversarial["adv_eps"] == pytest.approx(8 / 255)
    assert preset.adversarial["adv_steps"] == 10


@pytest.mark.parametrize("name", ["cifar10", "paper"])
def test_gpu_presets_follow_the_reference_recipes(name):
    preset = load_preset(name)
    if name == "paper":
        assert preset.models == ["resnet18", "vgg16_bn", "wrn28_10", "vit"]
        assert preset.datasets == ["cifar10", "cifar100", "tinyimagenet"]
    # Rice et al.: PGD-10 of 2/255 in train mode, 1,000 held-out images, best epoch kept.
    adv = rp.train_config(preset, rp.Cell("cifar10", "resnet18", "adversarial", 2.0, 0), None)
    assert (adv.adv_steps, adv.adv_model_mode, adv.val_examples) == (10, "train", 1000)
    assert adv.adv_alpha == pytest.approx(2 / 255)
    std = rp.train_config(preset, rp.Cell("cifar10", "resnet18", "standard", 2.0, 0), None)
    assert std.val_examples == 0 and std.decay_all_params and std.strong_augment == "none"
    # The ViT recipe: AdamW, TrivialAugment, no decay on norms/biases/embeddings, and no
    # label smoothing (it would confound T).
    vit = rp.train_config(preset, rp.Cell("cifar10", "vit", "standard", 2.0, 0), None)
    assert (vit.optimizer, vit.strong_augment, vit.decay_all_params) == \
        ("adamw", "trivialaugment", False)
    assert vit.label_smoothing == 0.0 and vit.warmup_epochs == 10 and vit.epochs == 300
    # Only a grid with adversarial cells (which hold out validation images) gets the columns.
    selection = ["best_epoch", "best_val_acc", "best_val_pgd_acc", "last_clean_acc",
                 "last_pgd_linf_acc"]
    has_adversarial = "adversarial" in preset.training
    assert (rp.result_columns(preset)[-5:] == selection) == has_adversarial


def test_the_short_gpu_preset_is_the_grid_in_one_slot():
    from tempsoft.study.estimate import estimate_preset

    preset = load_preset("cifar10-gpu-short")
    assert preset.models == ["cifar_cnn_wide"] and len(preset.temperatures) == 7
    assert preset.seeds == [0] and preset.training == ["standard"]
    assert {"clean", "corruption", "pgd_linf", "audit"} <= set(preset.eval["evals"])
    estimate = estimate_preset(preset)
    assert estimate.total < 8 * 60 and len(estimate.cells) == 7 and not estimate.missing
    projection = rp.project(preset)                 # what --dry-run prints
    assert projection.seconds == pytest.approx(estimate.total)
    text = str(projection)
    assert "one H100/H200 (estimated; tempsoft/study/estimate.py)" in text
    assert "not a measurement" in text
    assert "once: start-up and CPU image generation" in text


def test_the_estimate_counts_model_flops_per_layer():
    from tempsoft.study.estimate import forward_flops

    # ResNet-18 (CIFAR stem) is 0.56 GMACs at 32x32; WRN-28-10 5.25 GMACs.
    assert forward_flops("resnet18", 10, 3, 32) == pytest.approx(1.11e9, rel=0.01)
    assert forward_flops("wrn28_10", 10, 3, 32) == pytest.approx(10.49e9, rel=0.01)
    # 64x64 Tiny-ImageNet images cost 4x in a CNN; the ViT keeps 64 tokens (patch 8).
    assert forward_flops("resnet18", 200, 3, 64) == pytest.approx(
        4 * forward_flops("resnet18", 200, 3, 32), rel=0.01)
    assert forward_flops("vit", 10, 3, 64) < 1.1 * forward_flops("vit", 10, 3, 32)


# --------------------------------------------------------------------------------------
# Bad presets: every error names the key and the value
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, text", [
    (minimal(grid={"temperatures": [1.0, 0.0]}), r"temperatures has 0\.0.*T <= 0"),
    (minimal(grid={"temperatures": [-2]}), r"temperatures has -2"),
    (minimal(grid={"temperatures": []}), r"non-empty list"),
    (minimal(grid={"models": ["resnet1000"]}), r"unknown name 'resnet1000'"),
    (minimal(grid={"datasets": ["imagenet22k"]}), r"unknown name 'imagenet22k'"),
    (minimal(grid={"training": ["standard", "distilled"]}), r"'distilled'"),
    (minimal(grid={"seeds": [0, -1]}), r"seeds must be .* got \[0, -1\]"),
    (minimal(trian={"epochs": 2}), r"unknown top-level key 'trian'"),
    (minimal(train={"lrr": 0.1}), r"unknown key 'lrr' in \[train\]"),
    (minimal(train={"T": 2.0}), r"unknown key 'T' in \[train\] \(set by the grid"),
    (minimal(train={"epochs": "ten"}), r"epochs must be int, got 'ten'"),
    (minimal(train={"optimizer": "lion"}), r"optimizer must be one of .* got 'lion'"),
    (minimal(train={"lr_scaling": "sqrt"}), r"lr_scaling .* 'sqrt'"),
    (minimal(eval={"evals": ["clean", "fgsm"]}), r"unknown evaluation 'fgsm'"),
    (minimal(eval={"pgd_steps": 0}), r"pgd_steps must be an int >= 1, got 0"),
    (minimal(adversarial={"eps": -0.1}), r"adversarial.eps must be a positive number"),
    (minimal(models={"vitt": {"lr": 1e-3}}), r"\[models.vitt\] names an unknown model"),
    (minimal(run={"threads": -1}), r"run.threads must be an int >= 0"),
    (minimal(eval={"evals": ["clean", "released_c"]}), r"needs eval.released_c_root"),
])
def test_bad_presets_raise_naming_the_problem(raw, text):
    with pytest.raises(PresetError, match=text):
        validate_preset(raw, source="bad.toml")


def test_missing_grid_entry():
    raw = minimal()
    del raw["grid"]["models"]
    with pytest.raises(PresetError, match=r"\[grid\] needs models"):
        validate_preset(raw)


def test_invalid_toml_and_unknown_preset(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[grid\ndatasets = 3")
    with pytest.raises(PresetError, match="not valid TOML"):
        load_preset(bad)
    with pytest.raises(PresetError, match=r"unknown preset 'nope'.*'demo'"):
        load_preset("nope")
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "missing.toml")


def test_overrides_parse_and_apply():
    assert parse_override("grid.temperatures=[0.5, 2]") == (["grid", "temperatures"], [0.5, 2])
    assert parse_override("train.optimizer=adamw") == (["train", "optimizer"], "adamw")
    with pytest.raises(PresetError, match="section.key=value"):
        parse_override("epochs")
    preset = load_preset("demo", ["grid.seeds=[3]", "models.small_cnn.lr=0.01"])
    assert preset.seeds == [3]
    config = rp.train_config(preset, cells(preset)[0], checkpoint_dir=None)
    assert config.lr == 0.01 and config.T == 0.1 and config.seed == 3


def test_cell_configs_merge_sections_in_order():
    raw = minimal(grid={"training": ["standard", "adversarial"], "models": ["small_cnn"]},
                  train={"lr": 0.1, "epochs": 3},
                  datasets={"digits": {"train": {"lr": 0.2}, "eval": {"pgd_linf_eps": 0.2}}},
                  models={"small_cnn": {"epochs": 4}},
                  adversarial={"eps": 0.1, "alpha": 0.02, "steps": 3, "T": 1.0,
                               "epochs": 5})
    preset = validate_preset(raw)
    std, adv = cells(preset)
    c_std = rp.train_config(preset, std, None)
    c_adv = rp.train_config(preset, adv, None)
    assert (c_std.lr, c_std.epochs, c_std.adversarial) == (0.2, 4, False)
    assert (c_adv.epochs, c_adv.adversarial, c_adv.adv_T, c_adv.adv_steps) == (5, True, 1.0, 3)
    evals, settings = rp.eval_settings(preset, std)
    assert evals == ["clean"] and settings.pgd_linf_eps == 0.2


# --------------------------------------------------------------------------------------
# The demo, reduced, end to end
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    torch.set_num_threads(1)
    lines = []
    summary = reproduce("demo", out_dir=out, overrides=QUICK, progress=False, log=lines.append)
    summary.log_lines = lines
    return out, summary


def test_reduced_demo_logs_one_line_per_epoch_and_evaluation(quick_run):
    lines = quick_run[1].log_lines
    assert not any("\r" in line for line in lines)
    epochs = [l for l in lines if l.startswith("[train] digits/small_cnn/standard/T=0.5/seed=0")]
    assert [l.split(" epoch ")[1].split(":")[0] for l in epochs] == ["1/2", "2/2"]
    assert "img/s" in epochs[0] and "loss" in epochs[0]
    evals = [l for l in lines if l.startswith("[eval] ")]
    assert len([l for l in evals if l.startswith("[eval] audit:")]) == 4
    assert any(l.startswith("[audit] apgd-dlr") for l in lines)


def test_reduced_demo_writes_each_cells_history_csv(quick_run):
    run = quick_run[1].run_dir
    files = sorted((run / "history").glob("*.csv"))
    assert len(files) == 4
    history = read_results(files[0])
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(rp.HISTORY_COLUMNS) <= set(history[0]) and history[0]["images_per_s"] > 0


def test_reduced_demo_writes_claims(quick_run):
    run = quick_run[1].run_dir
    text = (run / "claims.md").read_text()
    from tempsoft.study.claims import RULES

    assert RULES in text and "| claim | digits / small_cnn |" in text
    # two temperatures, no T=1 cell: every claim is honestly untested
    assert text.count("not tested in this run") >= 6


def test_reduced_demo_writes_csv_markdown_and_plots(quick_run):
    out, summary = quick_run
    run = summary.run_dir
    assert summary.cells_run == 4 and summary.cells_skipped == 0
    rows = read_results(run / "results.csv")
    assert len(rows) == 4
    assert {r["T"] for r in rows} == {0.5, 5.0} and {r["seed"] for r in rows} == {0, 1}
    for r in rows:
        for key in ("clean_acc", "corruption_acc", "pgd_linf_acc", "pgd_l2_acc",
                    "audit_worst_acc", "ece", "ece_T1", "train_acc", "loss_ratio",
                    "grad_logits_norm_ep1", "wrong_class_entropy_norm_ep1"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert isinstance(r["trained"], bool) and isinstance(r["collapsed"], bool)
        assert len(r["per_class_acc"]) == 10 and sum(r["pred_hist"]) == 360
        assert 0 <= r["pgd_linf_acc"] <= r["clean_acc"] + 1e-9
    md = (run / "results.md").read_text()
    for title in ("Clean test accuracy", "Corruption accuracy", "PGD-Linf accuracy",
                  "raw logits: T = 1, as deployed",
                  "Gradient-masking audit", "Did it train?", "wrong-class gradient weights"):
        assert title in md
    assert "| small_cnn |" in md and "±" in md
    for stem in ("clean", "corruption", "pgd_linf", "pgd_l2", "audit", "diagnostics"):
        png = run / f"digits_standard_{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
    config = json.loads((run / "config.json").read_text())
    assert config["machine"]["cpu_count"] and config["code_version"]
    assert config["settings"]["train"]["epochs"] == 2
    assert (run / "models").is_dir() and not list((run / "checkpoints").glob("*"))


def test_rerun_skips_finished_cells(quick_run, monkeypatch):
    out, _ = quick_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(cell_module, "train", no_training)
    summary = reproduce("demo", out_dir=out, overrides=QUICK, progress=False, log=None)
    assert summary.cells_run == 0 and summary.cells_skipped == 4
    assert len(read_results(summary.run_dir / "results.csv")) == 4


def test_rerun_with_changed_settings_is_refused(quick_run):
    out, _ = quick_run
    with pytest.raises(PresetError, match=r"different settings .*'train'"):
        reproduce("demo", out_dir=out, overrides=QUICK + ["train.lr=0.2"], progress=False,
                  log=None)


def test_interrupted_study_resumes_the_cell_in_flight(tmp_path, monkeypatch):
    """Killed during a cell's evaluation: the rerun keeps the finished cells, and the
    interrupted cell reuses its final checkpoint instead of training again."""
    overrides = ["grid.temperatures=[0.5, 5.0]", "grid.seeds=[0]", "train.epochs=2",
                 "train.max_batches=4", 'eval.evals=["clean"]']
    real_evaluate = cell_module.evaluate
    calls = {"n": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(cell_module, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        reproduce("demo", out_dir=tmp_path, overrides=overrides, progress=False, log=None)
    run = tmp_path / "demo"
    assert len(read_results(run / "results.csv")) == 1
    monkeypatch.setattr(cell_module, "evaluate", real_evaluate)
    resumed = []
    real_train = cell_module.train

    def recording_train(config, **kw):
        result = real_train(config, **kw)
        resumed.append(result.resumed_from)
        return result

    monkeypatch.setattr(cell_module, "train", recording_train)
    summary = reproduce("demo", out_dir=tmp_path, overrides=overrides, progress=False,
                        log=None)
    assert summary.cells_run == 1 and resumed == [2]
    rows = read_results(run / "results.csv")
    assert [r["T"] for r in rows] == [0.5, 5.0]


def test_results_rows_are_appended_atomically_and_new_columns_kept(tmp_path):
    from tempsoft.study.store import append_row

    path = tmp_path / "results.csv"
    append_row(path, ["cell", "a"], {"cell": "x", "a": 1.5})
    append_row(path, ["cell", "a", "b"], {"cell": "y", "a": 2.0, "b": [1, 2]})
    rows = read_results(path)
    assert rows == [{"cell": "x", "a": 1.5, "b": None}, {"cell": "y", "a": 2.0, "b": [1, 2]}]
    assert not list(tmp_path.glob(".*tmp*"))   # no temporary file left behind


def test_adversarial_cell_reports_the_selected_and_the_last_epoch(tmp_path):
    """With a validation split the cell's model is the best validation-PGD epoch; the last
    epoch's clean and PGD accuracy are reported beside it."""
    overrides = ["grid.temperatures=[2.0]", "grid.seeds=[0]", 'grid.training=["adversarial"]',
                 "train.epochs=2", "train.max_batches=3", "adversarial.steps=2",
                 "adversarial.val_examples=48", 'eval.evals=["clean", "pgd_linf"]',
                 "eval.pgd_steps=2", "eval.pgd_examples=48"]
    summary = reproduce("demo", out_dir=tmp_path, overrides=overrides, progress=False,
                        log=None)
    (row,) = read_results(summary.run_dir / "results.csv")
    assert row["best_epoch"] in (1, 2) and 0 <= row["best_val_pgd_acc"] <= 1
    assert 0 <= row["last_pgd_linf_acc"] <= row["last_clean_acc"] <= 1
    slug = rp.cells(load_preset("demo", overrides))[0].slug
    assert (summary.run_dir / "models" / f"{slug}-best.pt").exists()
    history = read_results(summary.run_dir / "history" / f"{slug}.csv")
    assert [h["epoch"] for h in history] == [1, 2] and "val_pgd_acc" in history[0]
    assert "Last epoch's model" in (summary.run_dir / "results.md").read_text()
