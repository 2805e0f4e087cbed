"""What both command lines (shardtool, trainer) share: their two consoles, and a click Command that shows
any ShardtoolError (a config, data or checkpoint problem) as one line with no traceback, exit 2."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from shardtool.errors import ShardtoolError
from shardtool.readers.common import shown

err = Console(stderr=True, soft_wrap=True, highlight=False)  # one message, one line, even in CI logs
console = Console(soft_wrap=True, highlight=False)


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(shown(message))}")  # no raw escape codes from a path


def one_line_errors(interrupted: str) -> type[click.Command]:
    """A click Command class: ShardtoolError -> `error: ...`, exit 2; Ctrl-C -> INTERRUPTED (how to resume), exit 130."""

    class Command(click.Command):
        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except ShardtoolError as problem:
                error(str(problem))
                sys.exit(2)
            except KeyboardInterrupt:
                err.print(interrupted)
                sys.exit(130)

    return Command
