"""Class folders: root/<class>/<image> or root/<split>/<class>/<image> (given splits are kept)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from shardtool.readers.common import IMAGE_EXTS, make_key, shown
from shardtool.sample import Item, Sample, Skip

SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})


class FolderReader:
    """Yields one Sample per image file, sorted by path; never reads the bytes (workers do)."""

    label_sep = None
    labelled = True

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        children = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.given_splits = bool(children) and all(p.name.lower() in SPLIT_NAMES for p in children)
        self.ignored: list[dict[str, str]] = []
        self._files = list(self._walk())

    def _walk(self) -> Iterator[tuple[str | None, str, Path]]:
        """(split, class, file) for every file under a class folder; notes what lies elsewhere."""
        split_dirs = self._subdirs(self.root) if self.given_splits else [self.root]
        for split_dir in split_dirs:
            split = split_dir.name if self.given_splits else None
            for class_dir in self._subdirs(split_dir):
                for path in sorted(self._files_under(class_dir)):
                    yield split, class_dir.name, path

    def _subdirs(self, folder: Path) -> list[Path]:
        dirs = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                self._ignore(Path(entry.path), "hidden")
            elif entry.is_dir():
                dirs.append(Path(entry.path))
            else:
                self._ignore(Path(entry.path), "not in a class folder")
        return dirs

    def _files_under(self, folder: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = Path(dirpath, name)
                if name.startswith("."):
                    self._ignore(path, "hidden")
                else:
                    yield path

    def _ignore(self, path: Path, why: str) -> None:
        self.ignored.append({"path": shown(path.relative_to(self.root)), "reason": why})

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[Item]:
        for split, label, path in self._files:
            rel = shown(path.relative_to(self.root))
            key = make_key(rel)
            if path.suffix.lower() not in IMAGE_EXTS:
                yield Skip("unknown_extension", key, rel, f"{path.suffix or 'no extension'} is not an image type",
                           group=rel, split=split)
                continue
            yield Sample(key=key, label=label, group=rel, source=rel, path=str(path), split=split)
