"""The records that flow through `pack`: a Sample per image, a Skip per rejected input."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class Sample:
    """One image on its way to a shard.

    Readers fill `data` (the encoded bytes, or raw uint8 pixels when `raw_shape` is set) or `path`
    (read later, in a worker); they never decode. `label` is None for unlabelled data (a dump without
    categories). The processor returns a copy with `data` holding the output encoding, `ext` its
    extension and `stats` the per-channel pixel sums.
    """

    key: str
    label: str | None
    group: str
    source: str
    data: bytes | None = None
    path: str | None = None
    raw_shape: tuple[int, int, int] | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ext: str | None = None
    stats: tuple[tuple[float, ...], tuple[float, ...], int] | None = None  # sum, sum of squares, pixels

    def with_(self, **changes: Any) -> Sample:
        """A copy with `changes`; 8x faster than dataclasses.replace, which matters at 10k+ samples/s."""
        copy = object.__new__(Sample)
        for setter, value in zip(_SETTERS, _VALUES(self)):
            setter(copy, value)
        for name, value in changes.items():
            if name not in _FIELDS:
                raise TypeError(f"Sample has no field {name!r}")
            _FIELDS[name].__set__(copy, value)
        return copy

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:  # pickled by value: 10x faster than the dataclass default
        return Sample, (self.key, self.label, self.group, self.source, self.data, self.path,
                        self.raw_shape, self.split, self.meta, self.ext, self.stats)


_FIELDS = {name: getattr(Sample, name) for name in Sample.__slots__}  # slot descriptors: set past `frozen`
_SETTERS = tuple(slot.__set__ for slot in _FIELDS.values())
_VALUES = operator.attrgetter(*_FIELDS)


@dataclass(frozen=True, slots=True)
class Skip:
    """An input that was not packed, and why. Counted in the report, listed in rejects.jsonl."""

    reason: str
    key: str
    source: str
    detail: str = ""
    group: str = ""
    split: str | None = None
    digest: str = ""  # a picture dropped by --dedup: the digest of its bytes (dedup.py), journaled with it

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return Skip, (self.reason, self.key, self.source, self.detail, self.group, self.split, self.digest)

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "key": self.key, "source": self.source, "detail": self.detail}


Item = Sample | Skip


class Picture(NamedTuple):
    """What the duplicate report needs of a packed picture (dedup.py): the digest of its input bytes, taken
    in the worker that read them, and where it came from."""

    digest: str
    key: str
    source: str
    group: str

    def entry(self, dropped: str = "") -> list[str]:
        """Its line in a journal record's `pictures`: [digest, key, source, group] (group "" when it is the source,
        as for class folders), plus the skip reason when --dedup dropped it."""
        entry = [self.digest, self.key, self.source, "" if self.group == self.source else self.group]
        return entry + [dropped] if dropped else entry

    @staticmethod
    def parse(entry: list[str]) -> tuple[Picture, str]:
        """(the picture, the reason it was dropped or "") from its journal entry."""
        digest, key, source, group, *dropped = entry
        return Picture(digest, key, source, group or source), dropped[0] if dropped else ""
