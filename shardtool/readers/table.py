"""Dirty-CSV reading shared by the manifest and pixel readers.

Python's csv module ends a record at a bare carriage return, and real exports (FB Marketplace's
Products.csv) hold thousands of bare CRs inside unquoted fields. Only "\\n" ends a record here: we
split physical lines on "\\n" ourselves, drop the CR of a CRLF ending, hide any other CR from the
csv module behind a private-use character and put it back as a line break inside the field.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from shardtool.errors import ConfigError

_CR = "\ue000"
csv.field_size_limit(1 << 30)


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
    reader = csv.reader(_lines(path, encoding))
    try:
        header = [name.replace(_CR, "").strip() for name in next(reader)]
    except StopIteration:
        raise ConfigError(f"{path.name} is empty: a CSV needs a header row") from None
    except csv.Error as error:
        raise ConfigError(f"{path.name} header is not valid CSV: {error}") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise ConfigError(f"{path.name} line {reader.line_num} is not valid CSV: {error}") from None
            if fields:
                yield reader.line_num, [value.replace(_CR, "\n") for value in fields]

    return header, rows()


def need_column(name: str, header: list[str], what: str, source: Path | str) -> int:
    """The index of column `name`, or a ConfigError listing the columns that exist."""
    if name in header:
        return header.index(name)
    existing = ", ".join(repr(h) for h in header if h)
    raise ConfigError(f"{what} {name!r} is not a column of {Path(source).name}; its columns are {existing}")
