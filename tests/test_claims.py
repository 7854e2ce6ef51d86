"""Claim verdicts (tempsoft.study.claims): each rule on rows built to land on each side of it."""
import math

import pytest

from tempsoft.study.claims import (CONTRADICTED, HOLDS, MASKED, NOT_TESTED, RULES, WITHIN_NOISE,
                             CLEAN, FLIP, judge, paired, verdict_table, write_claims, CLAIMS)

TEMPS = (0.1, 1.0, 10.0, 100.0)


def _rows(metric: str, by_t: dict, training: str = "standard", seeds=(0, 1), jitter=0.0,
          extra=None):
    """One row per (T, seed): metric = by_t[T] + jitter * (+1 for seed 0, -1 for seed 1)."""
    rows = []
    for t, value in by_t.items():
        for s in seeds:
            row = {"dataset": "d", "model": "m", "training": training, "T": t, "seed": s,
                   metric: value + jitter * (1 if s == 0 else -1)}
            row.update((extra or {}).get(t, {}))
            rows.append(row)
    return rows


def _claim(key):
    return next(c for c in CLAIMS if c.key == key)


def test_paired_difference_and_band():
    values = {1.0: {0: 0.80, 1: 0.82}, 10.0: {0: 0.85, 1: 0.83}}
    p = paired(values, 10.0, 1.0, CLEAN)
    assert p.n == 2 and p.mean == pytest.approx(0.03)
    # d = (0.05, 0.01): sd 0.0283, band = max(0.01, 2 sd)
    assert p.band == pytest.approx(2 * math.sqrt(0.0008))
    assert p.outcome == "same"
    one_seed = paired({1.0: {0: 0.80}, 10.0: {0: 0.83}}, 10.0, 1.0, CLEAN)
    assert one_seed.band == CLEAN.min_effect and one_seed.outcome == "better"
    # lower is better for flip probability: a drop counts as better
    flips = paired({1.0: {0: 0.05}, 10.0: {0: 0.04}}, 10.0, 1.0, FLIP)
    assert flips.mean > 0 and flips.outcome == "better"


@pytest.mark.parametrize("accs,verdict", [
    ({0.1: 0.70, 1.0: 0.80, 10.0: 0.75, 100.0: 0.60}, HOLDS),
    ({0.1: 0.70, 1.0: 0.80, 10.0: 0.75, 100.0: 0.85}, CONTRADICTED),   # an end is best
    ({0.1: 0.795, 1.0: 0.80, 10.0: 0.75, 100.0: 0.60}, WITHIN_NOISE),  # within 1 point of T=0.1
])
def test_claim_1_moderate_temperature(accs, verdict):
    v = judge(_claim("1"), _rows("clean_acc", accs))
    assert v.verdict == verdict, v.reason
    assert "best interior T = 1" in v.reason


def test_claim_1_table_compares_with_t1_and_with_the_best_t_once_each():
    best_is_one = judge(_claim("1"), _rows("clean_acc", {0.1: 0.70, 1.0: 0.80, 10.0: 0.75,
                                                          100.0: 0.60}))
    rows = [line for line in best_is_one.tables[0] if line.startswith("| paired difference")]
    assert [r.split(",")[0] for r in rows] == ["| paired difference vs T=1"]
    best_is_ten = judge(_claim("1"), _rows("clean_acc", {0.1: 0.70, 1.0: 0.78, 10.0: 0.80,
                                                          100.0: 0.60}))
    rows = [line for line in best_is_ten.tables[0] if line.startswith("| paired difference")]
    assert [r.split(",")[0] for r in rows] == ["| paired difference vs T=1",
                                               "| paired difference vs T=10"]


def test_claim_1_needs_three_temperatures():
    assert judge(_claim("1"), _rows("clean_acc", {1.0: 0.8, 10.0: 0.7})).verdict == NOT_TESTED


def test_seed_spread_widens_the_band():
    accs = {0.1: 0.70, 1.0: 0.80, 10.0: 0.75, 100.0: 0.60}
    noisy = _rows("clean_acc", accs, jitter=0.0) + []
    for r in noisy:   # T=1's seeds disagree by 20 points: no difference is beyond noise
        if r["T"] == 1.0:
            r["clean_acc"] += 0.1 if r["seed"] == 0 else -0.1
    assert judge(_claim("1"), noisy).verdict == WITHIN_NOISE


def test_claim_2_gradient_size_and_direction():
    size = {0.1: 11.0, 1.0: 0.75, 10.0: 0.09, 100.0: 0.0095}
    ent = {0.1: 0.38, 1.0: 0.91, 10.0: 1.0, 100.0: 1.0}
    rows = _rows("grad_logits_norm_ep1", size)
    for r in rows:
        r["wrong_class_entropy_norm_ep1"] = ent[r["T"]]
    assert judge(_claim("2"), rows).verdict == HOLDS
    for r in rows:   # the gradient not shrinking at high T contradicts the size part
        if r["T"] == 100.0:
            r["grad_logits_norm_ep1"] = 1.0
    v = judge(_claim("2"), rows)
    assert v.verdict == CONTRADICTED and "size" in v.reason


@pytest.mark.parametrize("accs,verdict", [
    ({1.0: 0.50, 10.0: 0.55, 100.0: 0.45}, HOLDS),           # one T > 1 better
    ({1.0: 0.50, 10.0: 0.45, 100.0: 0.40}, CONTRADICTED),    # none better, some worse
    ({1.0: 0.50, 10.0: 0.505, 100.0: 0.499}, WITHIN_NOISE),
])
def test_claim_3_higher_t_against_t1(accs, verdict):
    assert judge(_claim("3"), _rows("corruption_acc", accs)).verdict == verdict


def test_claim_4_flip_probability_lower_is_better():
    v = judge(_claim("4"), _rows("flip_prob", {1.0: 0.05, 10.0: 0.03}))
    assert v.verdict == HOLDS


def _pgd_rows(pgd, audit, masked_at=()):
    rows = _rows("pgd_linf_acc", pgd)
    for r in rows:
        r["audit_worst_acc"] = audit[r["T"]]
        r["audit_masking"] = r["T"] in masked_at
    return rows


def test_claim_5_holds_only_under_a_masked_attack():
    rows = _pgd_rows({1.0: 0.10, 10.0: 0.40}, {1.0: 0.05, 10.0: 0.05}, masked_at={10.0})
    v = judge(_claim("5"), rows)
    assert v.verdict == MASKED and "audit flags masking at T=10" in v.reason


def test_claim_5_holds_when_the_audit_confirms_it():
    rows = _pgd_rows({1.0: 0.10, 10.0: 0.40}, {1.0: 0.05, 10.0: 0.20}, masked_at={10.0})
    assert judge(_claim("5"), rows).verdict == HOLDS


def test_claim_5_unflagged_gain_falls_back_to_the_audit():
    rows = _pgd_rows({1.0: 0.10, 10.0: 0.40}, {1.0: 0.05, 10.0: 0.02})
    v = judge(_claim("5"), rows)
    assert v.verdict == CONTRADICTED and "by the audit's worst case" in v.reason


def test_claim_6_uses_adversarial_training_only():
    rows = _pgd_rows({1.0: 0.10, 10.0: 0.40}, {1.0: 0.05, 10.0: 0.20})
    assert judge(_claim("6"), rows).verdict == NOT_TESTED
    for r in rows:
        r["training"] = "adversarial"
    assert judge(_claim("6"), rows).verdict == HOLDS


def test_claims_md_lists_rules_verdicts_and_tables(tmp_path):
    rows = _pgd_rows({0.1: 0.05, 1.0: 0.10, 10.0: 0.40}, {0.1: 0.0, 1.0: 0.05, 10.0: 0.05},
                     masked_at={10.0})
    for r in rows:
        r["clean_acc"] = {0.1: 0.7, 1.0: 0.8, 10.0: 0.75}[r["T"]]
    path = write_claims(tmp_path / "claims.md", rows, {"preset": "p", "code_version": "v"})
    text = path.read_text()
    assert RULES in text
    assert f"| 1. A moderate temperature gives the best accuracy | {HOLDS} |" in text
    assert f"| 5. A higher T improves robustness to untargeted PGD | {MASKED} |" in text
    assert "| clean accuracy (%) | T=0.1 | T=1 | T=10 |" in text
    assert verdict_table(rows)["3"] == {"d / m": NOT_TESTED}


def test_pgd_l2_is_not_confirmed_by_the_linf_audit():
    """The audit attacks in Linf: an L2 gain at a flagged T is not a confirmed gain."""
    rows = _pgd_rows({1.0: 0.10, 10.0: 0.40}, {1.0: 0.05, 10.0: 0.05}, masked_at={10.0})
    for r in rows:
        r["pgd_l2_acc"] = {1.0: 0.1, 10.0: 0.5}[r["T"]]
        r["pgd_linf_acc"] = 0.1
    v = judge(_claim("5"), rows)
    assert v.verdict == MASKED and "no audit in this threat model" in v.reason
    for r in rows:
        r["audit_masking"] = False
    assert judge(_claim("5"), rows).verdict == HOLDS


def test_gradient_diagnostics_have_no_better_or_worse_rows():
    rows = _rows("grad_logits_norm_ep1", {0.1: 11.0, 1.0: 0.75, 10.0: 0.09})
    for r in rows:
        r["wrong_class_entropy_norm_ep1"] = 0.5
    v = judge(_claim("2"), rows)
    assert all(len(t) == 3 for t in v.tables)   # header, rule, mean ± sd
