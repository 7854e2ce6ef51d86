"""experiments/REPRODUCING.md publishes only what the code wrote: every table in it is quoted
verbatim (marks included) from a committed results file, and every file it links exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "experiments" / "REPRODUCING.md"
RESULTS = ROOT / "experiments" / "results"
QUOTABLE = ("results.md", "claims.md", "SUMMARY.md")


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every markdown table: runs of lines starting with '|'."""
    out, block, start = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("|"):
            if not block:
                start = number
            block.append(line)
        elif block:
            out.append((start, block))
            block = []
    if block:
        out.append((start, block))
    return out


def result_files() -> list[Path]:
    return sorted(p for name in QUOTABLE for p in RESULTS.rglob(name))


def contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def test_tables_parse():
    text = "a\n| x | y |\n|---|---|\n| 1 | 2 |\nb\n| z |\n"
    assert tables(text) == [(2, ["| x | y |", "|---|---|", "| 1 | 2 |"]), (6, ["| z |"])]
    assert contains(["a", "| 1 |", "| 2 |"], ["| 1 |", "| 2 |"])
    assert not contains(["| 1 |", "a", "| 2 |"], ["| 1 |", "| 2 |"])


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _tracked() -> set[str] | None:
    """Paths git tracks under experiments/results, or None when ROOT is not the top of its own
    git checkout (a copy of the tracked files, as the CI stacks test, may sit inside another
    repository that ignores it and would list nothing)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != ROOT:
        return None
    listed = _git("ls-files", "experiments/results")
    return None if listed is None else set(listed.split())


def test_every_table_is_quoted_verbatim_from_a_committed_results_file():
    found = tables(DOC.read_text())
    assert found, "REPRODUCING.md shows no result table"
    tracked = _tracked()
    sources = {p: p.read_text().splitlines() for p in result_files()
               if tracked is None or p.relative_to(ROOT).as_posix() in tracked}
    for start, block in found:
        where = [p for p, lines in sources.items() if contains(lines, block)]
        assert where, (f"the table at REPRODUCING.md line {start} ({block[0]!r}) is not a "
                       "verbatim block of any committed "
                       "experiments/results/**/{results,claims,SUMMARY}.md")


def test_every_linked_file_exists():
    links = re.findall(r"\]\((results/[^)#\s]+)\)", DOC.read_text())
    assert links, "REPRODUCING.md links no result file"
    for link in links:
        assert (DOC.parent / link).exists(), f"REPRODUCING.md links {link}, which is missing"
