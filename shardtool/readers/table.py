"""Dirty-CSV reading shared by the manifest and pixel readers.

Python's csv module ends a record at a bare carriage return, and real exports (FB Marketplace's
Products.csv) hold thousands of bare CRs inside unquoted fields. Only "\\n" ends a record here: we
split physical lines on "\\n" ourselves, drop the CR of a CRLF ending, hide any other CR from the
csv module behind a private-use character and put it back as a line break inside the field.

One exception, so that rows are counted as the user counts lines: a record with more fields than the
header whose unquoted bare CRs cut it into rows of exactly the header's width was rows ended by CRs
(`a.jpg,cat\\rb.jpg,dog`), and is read as those rows. Row numbers count those CRs as line ends, and
a row's number is the line it starts on.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardtool.errors import ConfigError

_CR = "\ue000"
FIELD_LIMIT = 1 << 30  # csv's default 128 KiB is too small for real descriptions; raised for our reads only


def _lines(path: Path, encoding: str) -> Iterator[str]:
    with open(path, "rb") as raw:
        for number, line in enumerate(raw, start=1):  # binary iteration splits on b"\n" only
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"{path.name} line {number} is not {encoding} ({error.reason}): pass --encoding, e.g. latin-1"
                ) from None
            if text.endswith("\r\n"):
                text = text[:-2] + "\n"
            yield text.replace("\r", _CR)


def read_rows(path: str | Path, encoding: str = "utf-8-sig") -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and an iterator of (line number, fields) for each data row."""
    path = Path(path)
    record: list[str] = []  # the lines of the record the csv module is reading
    reader = csv.reader(_kept(_lines(path, encoding), record))
    try:
        header = [name.replace(_CR, "").strip() for name in _next(reader)]
    except StopIteration:
        raise ConfigError(f"{path.name} is empty: a CSV needs a header row") from None
    except csv.Error as error:
        raise ConfigError(f"{path.name} header is not valid CSV: {error}") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        cr_ends = 0  # bare CRs that ended a row so far: lines the user counts and "\\n" does not
        while True:
            start = reader.line_num + 1 + cr_ends
            record.clear()
            try:
                fields = _next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise ConfigError(f"{path.name} line {reader.line_num} is not valid CSV: {error}") from None
            parts = _rows_ended_by_cr(fields, record, len(header)) if fields else []
            for offset, part in enumerate(parts):
                yield start + offset, [value.replace(_CR, "\n").replace("\r", "\n") for value in part]
            cr_ends += max(len(parts) - 1, 0)

    return header, rows()


def _next(reader: Any) -> list[str]:
    """The next record, read with our field size limit; the csv module's global limit is put back after."""
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        return next(reader)
    finally:
        csv.field_size_limit(previous)


def _all(reader: Any) -> list[list[str]]:
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        return list(reader)
    finally:
        csv.field_size_limit(previous)


def _kept(lines: Iterator[str], record: list[str]) -> Iterator[str]:
    for line in lines:
        record.append(line)
        yield line


def _rows_ended_by_cr(fields: list[str], record: list[str], width: int) -> list[list[str]]:
    """The rows of a record: itself, or the rows its unquoted bare CRs end when it is too wide as one
    row and every one of those rows has exactly `width` fields."""
    if len(fields) <= width or not any(_CR in value for value in fields):
        return [fields]
    text = "".join(record).replace(_CR, "\r")
    parts = [part for part in _all(csv.reader(io.StringIO(text, newline=""))) if part]  # the csv module's own CR rule
    return parts if len(parts) > 1 and all(len(part) == width for part in parts) else [fields]


def need_column(name: str, header: list[str], what: str, source: Path | str) -> int:
    """The index of column `name`, or a ConfigError listing the columns that exist."""
    if name in header:
        return header.index(name)
    existing = ", ".join(repr(h) for h in header if h)
    raise ConfigError(f"{what} {name!r} is not a column of {Path(source).name}; its columns are {existing}")


def unique_columns(header: list[str], source: Path | str) -> None:
    """A ConfigError naming a column name that appears more than once: columns are picked by name, and
    a second `label` would silently win over the first. Empty names (unnamed index columns) may repeat."""
    for name, count in Counter(name for name in header if name).items():
        if count > 1:
            raise ConfigError(f"{Path(source).name} has {count} columns named {name!r}: rename all but one "
                              "(columns are picked by name)")
