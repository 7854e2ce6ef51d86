"""The paper's claims, the comparison that tests each one, and a verdict from fixed rules.

    >>> from tempsoft.study.claims import write_claims
    >>> write_claims("results/demo/claims.md", rows, config)

The rules (``RULES``) were written before any result was seen, are the same for every run
(the digits demo included) and are printed at the top of every claims.md. Every comparison
is paired by seed: a temperature is compared with another through the per-seed differences
of a metric, so that a seed's luck is shared by both sides.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

HOLDS = "holds"
WITHIN_NOISE = "within noise"
CONTRADICTED = "contradicted"
MASKED = "holds only under an attack the audit flags as masked"
NOT_TESTED = "not tested in this run"

RULES = """\
Rules (fixed before any result was seen; the same for every run):

- Comparisons are paired by seed: d = metric(T_a, seed) - metric(T_b, seed), averaged over the
  seeds both temperatures have. "Better" means higher, except for flip probability (lower).
- Noise band: max(minimum effect, 2 x the standard deviation of d over seeds). Minimum
  effect: 1 point for accuracies (0.01), 0.2 points for flip probability (0.002). With one
  seed the band is the minimum effect alone. T_a is better than T_b when d exceeds the band
  in the better direction, worse when it exceeds it in the other, otherwise within noise.
- Claim 1 (a moderate T is most accurate), on clean test accuracy: T* = the interior
  temperature (neither the smallest nor the largest of the grid) with the highest mean.
  holds: T* is better than both the smallest and the largest T. contradicted: an end of the
  grid is better than T*. Otherwise within noise.
- Claim 2 (T changes the gradient's size and direction), on the epoch-1 diagnostics. Size
  (mean norm of dLoss/dlogits): holds when it is below half its T=1 value at the largest T
  and above twice its T=1 value at the smallest T; contradicted when it is not below its T=1
  value at the largest T or not above it at the smallest T. Direction (entropy of the
  wrong-class gradient weights / ln(C-1)): holds when it rises by at least 0.1 from the
  smallest to the largest T and never falls by more than 0.02 from one T to the next;
  contradicted when it falls by more than 0.1 from the smallest to the largest T. The claim
  holds when both parts hold, is contradicted when either part is, else within noise.
- Claims 3-6 (a higher T improves robustness), each T > 1 against T = 1: holds when some
  T > 1 is better; contradicted when none is better and some T > 1 is worse; otherwise within
  noise. Claims 3-5 use standard training, claim 6 adversarial training.
- Claims 5 and 6 (PGD): the standard attack (PGD with CE at T = 1). PGD-Linf is checked
  against the gradient-masking audit's worst case over all its attacks (the audit attacks
  in Linf). If some T > 1 is better under PGD and also under the audit's worst case: holds.
  If the temperatures that are better under PGD are all flagged by the audit (a failed
  check, in at least one seed) and none is better under the audit's worst case: holds only
  under an attack the audit flags as masked. Otherwise the verdict is the audit worst
  case's own. PGD-L2 has no audit in its threat model: a gain holds only under an attack
  the audit flags as masked when every better T is flagged, else the PGD verdict stands.
  Over Linf and L2 the claim takes its best verdict, in the order holds, holds only under
  an attack the audit flags as masked, within noise, contradicted.
- not tested in this run: the run lacks the metric, T = 1, or temperatures on the tested side.
"""

ACCURACY_EFFECT = 0.01
FLIP_EFFECT = 0.002
SIZE_FACTOR = 2.0          # claim 2: the gradient norm must change by this factor
DIRECTION_RISE = 0.1       # claim 2: the normalised entropy must rise by this much
DIRECTION_SLACK = 0.02     # ... and never fall by more than this between neighbours


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    higher_is_better: bool = True
    min_effect: float = ACCURACY_EFFECT
    scale: float = 100.0   # shown in percent
    ranked: bool = True    # False: a diagnostic with no better side (no difference rows)
    audited: bool = False  # the audit's worst case is in this metric's threat model

    def fmt(self, value: float) -> str:
        if value is None or math.isnan(value):
            return "–"
        return f"{value * self.scale:.1f}" if self.scale == 100 else f"{value:.3g}"


CLEAN = Metric("clean_acc", "clean accuracy (%)")
CORRUPTION = Metric("corruption_acc", "corruption accuracy (%)")
FLIP = Metric("flip_prob", "flip probability (%)", higher_is_better=False,
              min_effect=FLIP_EFFECT)
PGD_LINF = Metric("pgd_linf_acc", "PGD-Linf accuracy (%)", audited=True)
PGD_L2 = Metric("pgd_l2_acc", "PGD-L2 accuracy (%)")
AUDIT = Metric("audit_worst_acc", "audit worst-case accuracy (%)")
GRAD_SIZE = Metric("grad_logits_norm_ep1", "epoch-1 mean |dL/dz|", scale=1.0, ranked=False)
GRAD_DIRECTION = Metric("wrong_class_entropy_norm_ep1", "epoch-1 wrong-class entropy / ln(C-1)",
                        scale=1.0, ranked=False)


@dataclass
class Claim:
    key: str
    text: str
    training: str
    metrics: tuple[Metric, ...]
    kind: str                       # "moderate", "gradient", "higher_t", "higher_t_pgd"


CLAIMS = (
    Claim("1", "A moderate temperature gives the best accuracy", "standard", (CLEAN,),
          "moderate"),
    Claim("2", "T changes the gradient's step size and its direction (a high T spreads it "
          "across the wrong classes)", "standard", (GRAD_SIZE, GRAD_DIRECTION), "gradient"),
    Claim("3", "A higher T improves robustness to common corruptions", "standard",
          (CORRUPTION,), "higher_t"),
    Claim("4", "A higher T improves robustness to natural perturbations", "standard", (FLIP,),
          "higher_t"),
    Claim("5", "A higher T improves robustness to untargeted PGD", "standard",
          (PGD_LINF, PGD_L2), "higher_t_pgd"),
    Claim("6", "A higher T can improve PGD adversarial training", "adversarial", (PGD_LINF,),
          "higher_t_pgd"),
)


# --------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------
@dataclass
class Paired:
    """metric(T_a) - metric(T_b) over shared seeds, signed so that > 0 is better."""

    mean: float
    band: float
    n: int

    @property
    def outcome(self) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        if self.mean > self.band:
            return "better"
        if self.mean < -self.band:
            return "worse"
        return "same"


def _values(rows: list[dict], column: str) -> dict[float, dict[int, float]]:
    out: dict[float, dict[int, float]] = {}
    for r in rows:
        v = r.get(column)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out.setdefault(float(r["T"]), {})[int(r["seed"])] = float(v)
    return out


def paired(values: dict[float, dict[int, float]], a: float, b: float, metric: Metric) -> Paired:
    """T_a against T_b on `metric`, positive when T_a is better."""
    seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
    sign = 1.0 if metric.higher_is_better else -1.0
    d = [sign * (values[a][s] - values[b][s]) for s in seeds]
    if not d:
        return Paired(float("nan"), float("nan"), 0)
    mean = sum(d) / len(d)
    band = metric.min_effect
    if len(d) >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        band = max(band, 2 * sd)
    return Paired(mean, band, len(d))


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


def _sd(values: dict[int, float]) -> float:
    if len(values) < 2:
        return float("nan")
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values.values()) / (len(values) - 1))


# --------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------
@dataclass
class Verdict:
    claim: Claim
    verdict: str
    reason: str
    tables: list[list[str]] = field(default_factory=list)


def judge(claim: Claim, rows: list[dict]) -> Verdict:
    """The verdict of one claim on one group of rows (one dataset, model and training)."""
    rows = [r for r in rows if r.get("training") == claim.training]
    values = {m.column: _values(rows, m.column) for m in claim.metrics + (AUDIT,)}
    primary = values[claim.metrics[0].column]
    if not primary:
        return Verdict(claim, NOT_TESTED, f"no {claim.training}-training cell with "
                       f"{claim.metrics[0].label}")
    if claim.kind == "moderate":
        return _moderate(claim, primary)
    if claim.kind == "gradient":
        return _gradient(claim, values)
    return _higher_t(claim, rows, values)


def _temperature_table(metric: Metric, values: dict[float, dict[int, float]],
                       best: Optional[float] = None) -> list[str]:
    temps = sorted(values)
    head = [f"| {metric.label} |" + "".join(f" T={t:g} |" for t in temps),
            "|---|" + "---:|" * len(temps)]
    cells = []
    for t in temps:
        m, sd = _mean(values[t]), _sd(values[t])
        text = metric.fmt(m) + ("" if math.isnan(sd) else f" ± {metric.fmt(sd)}")
        cells.append(text)
    lines = head + ["| mean ± sd over seeds |" + "".join(f" {c} |" for c in cells)]
    refs = [(1.0, "vs T=1")]
    if best is not None and best != 1.0:   # T* = 1 would repeat the row above
        refs.append((best, f"vs T={best:g}"))
    for ref, label in refs if metric.ranked else ():
        if ref not in values:
            continue
        diffs = []
        for t in temps:
            if t == ref:
                diffs.append("·")
                continue
            p = paired(values, t, ref, metric)
            sign = 1.0 if metric.higher_is_better else -1.0
            if p.n == 0:
                diffs.append("–")
            else:
                diffs.append(f"{_signed(sign * p.mean, metric)} ({_mark(p.outcome)})")
        lines.append(f"| paired difference {label}, band |" + "".join(f" {d} |" for d in diffs))
    return lines


def _signed(value: float, metric: Metric) -> str:
    shown = value * metric.scale if metric.scale == 100 else value
    return f"{shown:+.1f}" if metric.scale == 100 else f"{shown:+.3g}"


def _mark(outcome: str) -> str:
    return {"better": "better", "worse": "worse", "same": "within band"}.get(outcome, outcome)


def _moderate(claim: Claim, values: dict[float, dict[int, float]]) -> Verdict:
    temps = sorted(values)
    metric = claim.metrics[0]
    if len(temps) < 3:
        return Verdict(claim, NOT_TESTED, "fewer than 3 temperatures")
    interior = temps[1:-1]
    best = max(interior, key=lambda t: _mean(values[t]))
    lo, hi = paired(values, best, temps[0], metric), paired(values, best, temps[-1], metric)
    table = _temperature_table(metric, values, best)
    reason = (f"best interior T = {best:g}: {_signed(lo.mean, metric)} points vs T={temps[0]:g} "
              f"(band {metric.fmt(lo.band)}), {_signed(hi.mean, metric)} vs T={temps[-1]:g} "
              f"(band {metric.fmt(hi.band)})")
    if lo.outcome == "better" and hi.outcome == "better":
        return Verdict(claim, HOLDS, reason, [table])
    if "worse" in (lo.outcome, hi.outcome):
        return Verdict(claim, CONTRADICTED, reason, [table])
    return Verdict(claim, WITHIN_NOISE, reason, [table])


def _gradient(claim: Claim, values: dict[str, dict[float, dict[int, float]]]) -> Verdict:
    size, direction = (values[m.column] for m in claim.metrics)
    tables = [_temperature_table(m, values[m.column]) for m in claim.metrics]
    if 1.0 not in size or len(size) < 3:
        return Verdict(claim, NOT_TESTED, "needs T = 1 and temperatures on both sides", tables)
    temps = sorted(size)
    s1, s_lo, s_hi = _mean(size[1.0]), _mean(size[temps[0]]), _mean(size[temps[-1]])
    if s_hi < s1 / SIZE_FACTOR and s_lo > s1 * SIZE_FACTOR:
        size_v = HOLDS
    elif s_hi >= s1 or s_lo <= s1:
        size_v = CONTRADICTED
    else:
        size_v = WITHIN_NOISE
    ent = [_mean(direction[t]) for t in sorted(direction)]
    rise = ent[-1] - ent[0] if ent else float("nan")
    steady = all(b >= a - DIRECTION_SLACK for a, b in zip(ent, ent[1:]))
    if rise >= DIRECTION_RISE and steady:
        dir_v = HOLDS
    elif rise < -DIRECTION_RISE:
        dir_v = CONTRADICTED
    else:
        dir_v = WITHIN_NOISE
    reason = (f"size: |dL/dz| is {s_hi / s1:.3g}x its T=1 value at T={temps[-1]:g} and "
              f"{s_lo / s1:.3g}x at T={temps[0]:g} ({size_v}); direction: the normalised "
              f"wrong-class entropy goes from {ent[0]:.2f} to {ent[-1]:.2f}"
              f"{'' if steady else ', not monotonically'} ({dir_v})")
    if size_v == HOLDS and dir_v == HOLDS:
        verdict = HOLDS
    elif CONTRADICTED in (size_v, dir_v):
        verdict = CONTRADICTED
    else:
        verdict = WITHIN_NOISE
    return Verdict(claim, verdict, reason, tables)


def _higher_t(claim: Claim, rows: list[dict], values: dict) -> Verdict:
    verdicts, reasons, tables = [], [], []
    for metric in claim.metrics:
        v, why, table = _higher_t_one(claim, rows, metric, values)
        verdicts.append(v)
        reasons.append(f"{metric.label}: {why}")
        tables += table
    order = [HOLDS, MASKED, WITHIN_NOISE, CONTRADICTED, NOT_TESTED]
    # Several attacks (Linf, L2): the claim holds if it holds under any of them.
    verdict = min(verdicts, key=order.index)
    return Verdict(claim, verdict, "; ".join(reasons), tables)


def _higher_t_one(claim: Claim, rows: list[dict], metric: Metric, values: dict
                  ) -> tuple[str, str, list[list[str]]]:
    vals = values[metric.column]
    if not vals:
        return NOT_TESTED, "not measured", []
    table = [_temperature_table(metric, vals)]
    base = _basic_higher_t(vals, metric)
    if base[0] == NOT_TESTED or claim.kind != "higher_t_pgd":
        return base[0], base[1], table
    audit_vals = values[AUDIT.column]
    if not audit_vals:
        return base[0], base[1] + "; not audited", table
    if not metric.audited:
        # No audit in this threat model (the audit attacks in Linf): a gain counts only where
        # the audit does not flag the gradients.
        if base[0] == HOLDS and base[2] and base[2] <= _masked(rows):
            return MASKED, (f"{base[1]}, but the audit flags masking at "
                            f"{_temperatures(base[2])}; no audit in this threat model"), table
        return base[0], base[1] + "; no audit in this threat model", table
    table.append(_temperature_table(AUDIT, audit_vals))
    trusted = _basic_higher_t(audit_vals, AUDIT)
    if base[0] == HOLDS and trusted[0] == HOLDS:
        return HOLDS, f"{base[1]}; audit worst case: {trusted[1]}", table
    if base[0] == HOLDS and base[2] and base[2] <= _masked(rows):
        return MASKED, (f"{base[1]}, but the audit flags masking at "
                        f"{_temperatures(base[2])}; audit worst case: {trusted[1]}"), table
    return trusted[0], f"by the audit's worst case: {trusted[1]} (PGD alone: {base[1]})", table


def _masked(rows: list[dict]) -> set[float]:
    """Temperatures where the audit flags masking in at least one seed."""
    return {float(r["T"]) for r in rows if r.get("audit_masking") is True}


def _temperatures(temps: Iterable[float]) -> str:
    return ", ".join(f"T={t:g}" for t in sorted(temps))


def _basic_higher_t(values: dict[float, dict[int, float]], metric: Metric
                    ) -> tuple[str, str, set[float]]:
    if 1.0 not in values:
        return NOT_TESTED, "no T = 1 cell", set()
    high = [t for t in sorted(values) if t > 1.0]
    if not high:
        return NOT_TESTED, "no T > 1 cell", set()
    comps = {t: paired(values, t, 1.0, metric) for t in high}
    better = {t for t, p in comps.items() if p.outcome == "better"}
    worse = {t for t, p in comps.items() if p.outcome == "worse"}
    detail = ", ".join(f"T={t:g} {_signed(p.mean if metric.higher_is_better else -p.mean, metric)}"
                       f" (band {metric.fmt(p.band)})" for t, p in comps.items())
    if better:
        return HOLDS, f"better than T=1 at {', '.join(f'T={t:g}' for t in sorted(better))} " \
                      f"[{detail}]", better
    if worse:
        return CONTRADICTED, f"no T > 1 better than T=1, worse at " \
                             f"{', '.join(f'T={t:g}' for t in sorted(worse))} [{detail}]", better
    return WITHIN_NOISE, f"every T > 1 within the band of T=1 [{detail}]", better


# --------------------------------------------------------------------------------------
# claims.md
# --------------------------------------------------------------------------------------
def groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (dataset, model), in their order of appearance (both trainings together)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["model"]), []).append(r)
    return out


def judge_all(rows: list[dict]) -> dict[tuple[str, str], list[Verdict]]:
    return {key: [judge(c, group) for c in CLAIMS] for key, group in groups(rows).items()}


def write_claims(path: str | os.PathLike, rows: list[dict], config: dict) -> Path:
    """claims.md: a summary table, then for each (dataset, model) each claim's comparison,
    its numbers and its verdict, under the fixed rules."""
    path = Path(path)
    judged = judge_all(rows)
    out = [f"# Claims: {path.parent.name} (preset {config.get('preset', '?')})", "",
           f"- code: {config.get('code_version', '?')}; {len(rows)} finished cells", "",
           RULES, "## Verdicts", ""]
    keys = list(judged)
    out.append("| claim | " + " | ".join(f"{d} / {m}" for d, m in keys) + " |")
    out.append("|---|" + "---|" * len(keys))
    for i, claim in enumerate(CLAIMS):
        out.append(f"| {claim.key}. {claim.text} | "
                   + " | ".join(judged[k][i].verdict for k in keys) + " |")
    out.append("")
    for (dataset, model), verdicts in judged.items():
        out += [f"## {dataset} / {model}", ""]
        for v in verdicts:
            out += [f"### Claim {v.claim.key}: {v.claim.text} ({v.claim.training} training)",
                    "", f"**{v.verdict}**: {v.reason}", ""]
            for table in v.tables:
                out += table + [""]
    path.write_text("\n".join(out))
    return path


def write_summary(path: str | os.PathLike, runs: dict[str, list[dict]]) -> Path:
    """SUMMARY.md: every claim's verdict in every run (one column per run, dataset and
    model), the runs' rows read from their results.csv by the caller."""
    path = Path(path)
    columns: list[tuple[str, tuple[str, str], list[Verdict]]] = []
    for run, rows in runs.items():
        for key, verdicts in judge_all(rows).items():
            columns.append((run, key, verdicts))
    out = ["# Claim verdicts across runs", "",
           "Each column is one run of `tempsoft reproduce` (its claims.md has the comparisons "
           "and numbers behind each verdict); the rules are in any claims.md.", "",
           "| claim | " + " | ".join(f"{run} ({d} / {m})" for run, (d, m), _ in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for i, claim in enumerate(CLAIMS):
        out.append(f"| {claim.key}. {claim.text} | "
                   + " | ".join(v[i].verdict for _, _, v in columns) + " |")
    path.write_text("\n".join(out) + "\n")
    return path


def verdict_table(rows: Iterable[dict]) -> dict[str, dict[str, str]]:
    """claim key -> "dataset / model" -> verdict (for tests and summaries)."""
    judged = judge_all(list(rows))
    return {c.key: {f"{d} / {m}": judged[(d, m)][i].verdict for (d, m) in judged}
            for i, c in enumerate(CLAIMS)}


__all__ = ["CLAIMS", "RULES", "HOLDS", "WITHIN_NOISE", "CONTRADICTED", "MASKED", "NOT_TESTED",
           "judge", "judge_all", "paired", "verdict_table", "write_claims", "write_summary"]
