"""Files that appear whole or not at all, and leave nothing behind when writing them fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yields TMP (default PATH.tmp) to write; once the block ends it replaces PATH (os.replace, atomic),
    and if the block raises (a full disk, a failed check, Ctrl-C) TMP is removed and PATH left as it was."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
