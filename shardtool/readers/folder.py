"""Class folders: root/<class>/<image> or root/<split>/<class>/<image> (given splits are kept)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from shardtool.readers.common import IMAGE_EXTS, has_control, make_key, shown
from shardtool.sample import Item, Sample, Skip

SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})


class FolderReader:
    """Yields one Sample per image file, sorted by path; never reads the bytes (workers do).

    Every folder is read at most once. A symlinked folder is followed when it leads outside SOURCE to a
    folder not read yet; one that leads back into SOURCE, to SOURCE or around it, or to a folder already
    read is not followed and is listed under `ignored`, so the tree is never packed twice. The pack's
    own OUT (`exclude`), where it lies inside SOURCE, is never read: a re-run would read the shards of
    the first as a class.
    """

    label_sep = None
    labelled = True

    def __init__(self, root: str, exclude: str | None = None) -> None:
        self.root = Path(root)
        self.ignored: list[dict[str, str]] = []
        self._exclude = Path(exclude).resolve() if exclude else None
        self._read = [self.root.resolve()]  # the real folders read so far: SOURCE and followed symlinks
        top = self._subdirs(self.root)
        self.given_splits = bool(top) and all(p.name.lower() in SPLIT_NAMES for p in top)
        self._files = list(self._walk(top))

    def _walk(self, top: list[Path]) -> Iterator[tuple[str | None, str, Path]]:
        """(split, class, file) for every file under a class folder; notes what lies elsewhere."""
        splits = [(folder.name, folder) for folder in top] if self.given_splits else [(None, None)]
        for split, folder in splits:
            for class_dir in self._subdirs(folder) if folder else top:
                for path in sorted(self._files_under(class_dir)):
                    yield split, class_dir.name, path

    def _subdirs(self, folder: Path) -> list[Path]:
        dirs = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                self._ignore(Path(entry.path), "hidden")
            elif not entry.is_dir():
                self._ignore(Path(entry.path), "not in a class folder")
            elif self._is_out(entry):
                self._ignore(Path(entry.path), "the output folder OUT")
            elif self._follows(entry):
                dirs.append(Path(entry.path))
        return dirs

    def _files_under(self, folder: Path) -> Iterator[Path]:
        """Every file below `folder`, subfolders included (a stack, not recursion: any depth)."""
        stack = [folder]
        while stack:
            for entry in sorted(os.scandir(stack.pop()), key=lambda e: e.name):
                path = Path(entry.path)
                if entry.name.startswith("."):
                    self._ignore(path, "hidden")
                elif not entry.is_dir():
                    yield path
                elif self._is_out(entry):
                    self._ignore(path, "the output folder OUT")
                elif self._follows(entry):
                    if path.suffix.lower() in IMAGE_EXTS:
                        self._ignore(path, "folder named like an image")
                    stack.append(path)

    def _is_out(self, entry: os.DirEntry[str]) -> bool:
        return self._exclude is not None and Path(entry.path).resolve() == self._exclude

    def _follows(self, entry: os.DirEntry[str]) -> bool:
        """Whether to read a folder: a real one always, a symlinked one only where nothing is read twice."""
        if not entry.is_symlink():
            return True
        target = Path(entry.path).resolve()
        why = self._read_twice(target)
        if why:
            self._ignore(Path(entry.path), f"{why}, not followed")
            return False
        self._read.append(target)
        return True

    def _read_twice(self, target: Path) -> str | None:
        """Why reading the real folder `target` would read some folder twice, or None."""
        root, *followed = self._read
        if target == root or target in root.parents:
            return "symlink back to SOURCE or around it"
        if root in target.parents:
            return "symlink into SOURCE"
        if any(target == done or done in target.parents or target in done.parents for done in followed):
            return "symlink to a folder already read"
        return None

    def _ignore(self, path: Path, why: str) -> None:
        self.ignored.append({"path": shown(path.relative_to(self.root)), "reason": why})

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[Item]:
        for split, label, path in self._files:
            rel = shown(path.relative_to(self.root))
            key = make_key(rel)
            if has_control(label):
                yield Skip("bad_label", key, rel, f"the class folder's name holds a control character: {label!r}",
                           group=rel, split=split)
                continue
            if path.suffix.lower() not in IMAGE_EXTS:
                yield Skip("unknown_extension", key, rel, f"{path.suffix or 'no extension'} is not an image type",
                           group=rel, split=split)
                continue
            yield Sample(key=key, label=label, group=rel, source=rel, path=str(path), split=split)
