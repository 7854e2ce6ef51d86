"""The `tempsoft` command line: train -> eval -> attack on digits, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempsoft.cli import main

ROOT = Path(__file__).resolve().parents[1]


# Tiny 8x8 models: one thread is as fast and does not stall on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    torch.set_num_threads(1)
    code = main(["train", "--dataset", "digits", "--model", "small_cnn", "--T", "2",
                 "--epochs", "2", "--batch-size", "32", "--max-batches", "5", "--lr", "0.05",
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_model_checkpoint_and_history(trained, capsys):
    assert (trained / "model.pt").is_file() and (trained / "checkpoint.pt").is_file()
    history = json.loads((trained / "history.json").read_text())
    assert len(history) == 2 and "wrong_class_entropy_norm" in history[0]


def test_eval_reports_metrics_and_health(trained, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["eval", str(trained / "model.pt"), "--evals", "clean,ece,pgd_linf",
                 "--linf-eps", "0.1", "--linf-alpha", "0.05", "--steps", "2",
                 "--examples", "32", "--json", str(out), "--device", "cpu"])
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in ("clean_acc", "ece", "pgd_linf_acc", "trained", "collapsed", "health",
                "per_class_acc", "pred_hist", "train_acc", "loss_ratio"):
        assert key in metrics, key
    text = capsys.readouterr().out
    assert "trained at T=2" in text and "clean_acc" in text


def test_attack_with_audit(trained, capsys):
    code = main(["attack", str(trained / "model.pt"), "--norm", "l2", "--eps", "0.5",
                 "--alpha", "0.1", "--steps", "2", "--examples", "24", "--audit",
                 "--apgd-steps", "3", "--autoattack", "custom", "--square-queries", "20",
                 "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert "pgd_l2_acc" in text and "audit_verdict" in text
    assert "[audit] autoattack (custom: apgd-ce, apgd-t)" in text and "[audit] square" in text
    assert "[eval] audit verdict:" in text


@pytest.mark.parametrize("argv, text", [
    (["train", "--T", "0"], "T must be positive and finite, got T=0.0"),
    (["train", "--T", "-3"], "T=-3.0"),
    (["train", "--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["train", "--dataset", "mnist-ish"], "unknown dataset 'mnist-ish'"),
    (["reproduce", "--preset", "nope"], "unknown preset 'nope'"),
    (["reproduce"], "reproduce needs --preset"),
    (["reproduce", "--preset", "demo", "--set", "grid.temperatures=[0]"],
     "temperatures has 0"),
    (["reproduce", "--preset", "demo", "--set", "train.epoch=3"], "unknown key 'epoch'"),
    (["eval", "does/not/exist.pt"], "no model file at 'does/not/exist.pt'"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
])
def test_bad_input_exits_2_with_one_clear_line(argv, text, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tempsoft: error:") and text in err, err


def test_eval_rejects_unknown_evaluation(trained, capsys):
    assert main(["eval", str(trained / "model.pt"), "--evals", "clean,fgsm"]) == 2
    assert "unknown evaluation 'fgsm'" in capsys.readouterr().err


def test_reproduce_dry_run_and_list(capsys):
    assert main(["reproduce", "--preset", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "digits/small_cnn/standard/T=0.1/seed=0" in out and "14 cells" in out
    assert main(["reproduce", "--preset", "cifar10-gpu-short", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7 cells" in out and "on one H100/H200 (estimated" in out
    assert "not a measurement" in out
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "demo" in listing and "cifar10" in listing and "paper" in listing


def test_python_dash_m_tempsoft_help():
    done = subprocess.run([sys.executable, "-m", "tempsoft", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "eval", "attack", "reproduce", "bench", "demo"):
        assert command in done.stdout
