"""What an option's value may be, written once: the click type that parses a flag and the validate() that
checks a config built in Python or from a YAML file read the same Range, so a value is refused the same way
(one line naming the option) wherever it comes from, before any work starts.

    Range(int, 1)                  an integer >= 1
    Range(float, 0, 1, high_open)  a finite number in [0, 1)
    Range(int, 32, 2048, zero)     0 (the default's meaning) or an integer from 32 to 2048
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from shardtool.errors import ConfigError

MAX_WORKERS = 256  # processes: more is a typo, not a machine


@dataclass(frozen=True)
class Range:
    """Numbers of KIND (int or float; floats always finite) from LOW to HIGH, each end open or closed."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    zero: bool = False  # 0 is allowed besides [low, high]: "0: off" or "0: the model's own"

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        low, high = (None if end is None else f"{end:g}" if self.kind is float else str(int(end))
                     for end in (self.low, self.high))
        if low is not None and high is not None and not (self.low_open or self.high_open):
            bounds = f" from {low} to {high}"
        else:
            bounds = "".join(((f" {'>' if self.low_open else '>='} {low}" if low is not None else ""),
                              (" and" if low is not None and high is not None else ""),
                              (f" {'<' if self.high_open else '<='} {high}" if high is not None else "")))
        return ("0 or " if self.zero else "") + what + bounds

    def admits(self, value: float) -> bool:
        if self.zero and value == 0:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, flag: str, value: Any) -> None:
        """Raise ConfigError naming FLAG unless VALUE (None passes: 'not given') is in range."""
        wrong_type = isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int)
        if value is not None and (wrong_type or not self.admits(value)):
            raise ConfigError(f"{flag} {value!r}: must be {self.describe()}")


class Bounded(click.ParamType):
    """A click type for a Range: 'abc', nan, inf and out-of-range values are click's one-line usage error."""

    def __init__(self, range_: Range) -> None:
        self.range = range_
        self.name = "integer" if range_.kind is int else "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            given = isinstance(value, (int, float)) and not isinstance(value, bool)
            number = value if given else self.range.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {'an integer' if self.range.kind is int else 'a number'}", param, ctx)
        if self.range.kind is int and isinstance(number, float):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if not self.range.admits(number):
            self.fail(f"{value!r}: must be {self.range.describe()}", param, ctx)
        return self.range.kind(number)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(flag: str, name: str) -> None:
    if not DEVICE.fullmatch(name):
        raise ConfigError(f"{flag} {name!r}: use auto, cpu, cuda or cuda:N")


class Device(click.ParamType):
    """auto | cpu | cuda | cuda:N, checked as parsed (whether CUDA is there is told when the device is opened)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not DEVICE.fullmatch(str(value)):
            self.fail(f"{value!r}: use auto, cpu, cuda or cuda:N", param, ctx)
        return str(value)


def output_file_problem(path: str) -> str | None:
    """Why PATH cannot be written as a file (None: it can): told before the work whose result it holds."""
    target = Path(path)
    if target.is_dir():
        return "is a folder: give a file name"
    parent = target.parent
    if not parent.is_dir():
        return f"cannot be written: its folder {parent} does not exist"
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return "cannot be written: permission denied"
    return None


def output_folder_problem(path: str) -> str | None:
    """Why PATH cannot be (made) a folder to write into; missing parents are made, as mkdir -p does."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        return "is a file, not a folder"
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"cannot be made: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: permission denied in {existing}"
    return None


def check_output_file(flag: str, path: str) -> None:
    if path and (problem := output_file_problem(path)):
        raise ConfigError(f"{flag} {path} {problem}")


def check_output_folder(flag: str, path: str) -> None:
    if path and (problem := output_folder_problem(path)):
        raise ConfigError(f"{flag} {path} {problem}")


class Output(click.Path):
    """A path to write (a file, or with folder=True a folder), refused as parsed when it cannot be written."""

    def __init__(self, folder: bool = False) -> None:
        super().__init__()
        self.folder = folder

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        problem = (output_folder_problem if self.folder else output_file_problem)(str(value)) if value else None
        if problem:
            self.fail(f"{str(value)!r} {problem}", param, ctx)
        return value
