"""Every number in a table of README.md or docs/*.md comes from a committed benchmark result, or the table says
it is an observation.

A table whose introducing paragraph names `benchmarks/results/NAME.md` (or .json) is checked against NAME.json: each
number in its cells (the first column, the row's label, aside) must be one of the JSON's numbers as the
table shows it (rounded to the digits shown; shares and accuracies also as percentages, seconds also as
minutes). A table that names no results file may hold numbers only when that paragraph calls them an
observation. Numbers glued to letters (bf16, 512x512, v1.2) are names, not figures. Each page is checked on its
own (a failure names the page and line); over all pages together more than 100 numbers must have been checked,
so a table that moves from one page to another is still counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.,])-?\d[\d,]*(?:\.\d+)?(?![\w.]*\w)")  # "1,163-1,494": two numbers
RESULT = re.compile(r"benchmarks/results/([\w-]+)\.(?:md|json)")
# Pages whose tables define things rather than measure them (field values, mode bits, byte counts of a format).
NOT_MEASUREMENTS = {"docs/FORMAT.md": "the shard format's specification: its numbers are field values"}
PAGES = ["README.md"] + sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md"))


def tables(text: str) -> Iterator[tuple[int, str, list[list[str]]]]:
    """(line number, introducing paragraph, body rows as cells) of every markdown table."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            start, intro = i, []
            j = i - 1
            while j >= 0 and not lines[j].startswith("#") and len(intro) < 20:
                intro.insert(0, lines[j])
                j -= 1
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([cell.strip() for cell in lines[i].strip("|").split("|")])
                i += 1
            yield start + 1, _last_paragraph(intro), rows
        else:
            i += 1


def _last_paragraph(lines: list[str]) -> str:
    """The text from the last code block or heading before the table: what introduces it."""
    text = "\n".join(lines)
    return text.rsplit("```", 1)[-1]


def leaves(data: Any) -> Iterator[float]:
    if isinstance(data, bool):
        return
    if isinstance(data, (int, float)):
        yield float(data)
    elif isinstance(data, dict):
        for value in data.values():
            yield from leaves(value)
    elif isinstance(data, list):
        for value in data:
            yield from leaves(value)


def shown(token: str) -> tuple[float, int]:
    plain = token.replace(",", "")
    return float(plain), len(plain.split(".")[1]) if "." in plain else 0


def backed(token: str, values: set[float]) -> bool:
    number, digits = shown(token)
    scales = (1, 100, 1 / 60)  # as is, as a percentage, seconds as minutes
    return any(abs(round(value * scale, digits) - number) < 1e-9 for value in values for scale in scales)


def check(page: str) -> tuple[int, list[str]]:
    """(numbers checked against a results file, problems) for one page."""
    text = (ROOT / page).read_text(encoding="utf-8")
    problems, checked = [], 0
    for line, intro, rows in tables(text):
        numbers = [token for row in rows for cell in row[1:] for token in NUMBER.findall(cell)]
        named = RESULT.findall(intro)
        if not named:
            if numbers and "observation" not in intro.lower():
                problems.append(f"{page} line {line}: a table of numbers that names no benchmarks/results file and "
                                "is not labelled an observation")
            continue
        values = {v for name in named for v in leaves(json.loads((ROOT / "benchmarks" / "results" / f"{name}.json")
                                                                 .read_text()))}
        missing = [token for token in numbers if not backed(token, values)]
        checked += len(numbers)
        if missing:
            problems.append(f"{page} line {line} ({', '.join(named)}): not in the results: {', '.join(missing[:8])}")
    return checked, problems


@pytest.mark.parametrize("page", [page for page in PAGES if page not in NOT_MEASUREMENTS])
def test_every_number_in_a_table_is_in_its_results_file_or_labelled_an_observation(page):
    checked, problems = check(page)
    print(f"{page}: {checked} numbers checked")
    assert not problems, "\n".join(problems)


def test_the_tables_were_found_and_read():
    counts = {page: check(page)[0] for page in PAGES if page not in NOT_MEASUREMENTS}
    print(", ".join(f"{page}: {count}" for page, count in counts.items()))
    assert sum(counts.values()) > 100, counts
