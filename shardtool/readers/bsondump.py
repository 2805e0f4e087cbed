"""MongoDB BSON dumps (Cdiscount's train.bson / test.bson): one Sample per picture.

A dump is BSON documents back to back, each starting with its int32 length. The main process only
walks those length prefixes (over an mmap, ~1 us per document) to cut the file into byte ranges of a
few hundred documents; worker processes decode their own ranges with pymongo's C decoder, so N cores
share one big file and the main process never decodes a document.

Damage is a counted Skip, never the end of the run: a length prefix that is impossible, runs past
the end of the file or does not frame a document that decodes is skipped by searching forward for
the next document start (`<int32 length><type>_id\\0`; mongodump always writes `_id` first).
"""

from __future__ import annotations

import mmap
import re
import struct
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import bson  # pymongo's
from bson.errors import BSONError

from shardtool.errors import ConfigError
from shardtool.readers.common import make_key
from shardtool.sample import Item, Sample, Skip

MAX_DOCUMENT = 64 << 20  # MongoDB's own limit is 16 MiB; anything past this is a broken prefix
_INT32 = struct.Struct("<i")
_TYPES = frozenset({*range(0x01, 0x14), 0x7F, 0xFF})  # the BSON element types
_ID_FIELD = b"_id\x00"
PEEK_DOCUMENTS = 100  # documents read to decide whether a dump is labelled
RELEASE_BYTES = 16 << 20
PARTITION_DOCUMENTS = 256
_INTEGER = re.compile(r"-?\d+")


class Document(NamedTuple):
    start: int
    end: int
    fields: dict[str, Any]


def as_text(value: Any) -> str | None:
    """An id-like value as text: ints, integral floats, strings, ObjectIds; None for anything else."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, bytes)):
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def product_key(product: str, is_string: bool) -> str:
    """The sample-key stem of an _id: the id itself when safe, else sanitised + a hash (make_key).

    A string id that reads as a number gets the hash too, so the string "7" and the int 7 (distinct
    _ids to MongoDB) never share tar member names.
    """
    if is_string and re.fullmatch(r"-?\d+", product):
        return make_key(product + " (string)")
    return make_key(product)


def plausible(buf: mmap.mmap, start: int) -> int:
    """The length of a document starting at `start`, or 0 if its prefix cannot be one."""
    if start + 5 > len(buf):
        return 0
    (length,) = _INT32.unpack_from(buf, start)
    if not 5 <= length <= MAX_DOCUMENT or start + length > len(buf) or buf[start + length - 1] != 0:
        return 0
    return length


def looks_like_bson(path: Path) -> bool:
    """The file starts with a well-formed document."""
    with open(path, "rb") as file:
        head = file.read(5)
    if len(head) < 5 or path.stat().st_size == 0:
        return False
    (length,) = _INT32.unpack_from(head, 0)
    return 5 <= length <= min(MAX_DOCUMENT, path.stat().st_size) and (head[4] in _TYPES or length == 5)


def _release(buf: mmap.mmap, start: int, end: int) -> int:
    """Drop the mapped pages of buf[start:end] from our RSS (they stay in the page cache); returns
    where the next release should start. Without this a walk over a 58 GB file 'uses' 58 GB."""
    first = start - start % mmap.PAGESIZE
    last = end - end % mmap.PAGESIZE
    if last > first:
        buf.madvise(mmap.MADV_DONTNEED, first, last - first)
    return last


class BsonReader:
    """Yields one Sample per picture (key `<_id>_<i>`, group `_id`), Skips for damaged documents.

    A dump whose first documents carry no `category_id` (Cdiscount's test.bson) is unlabelled: its
    samples have no label and go to the split `unlabelled`, keeping `_id` for per-product predictions.
    """

    ignored: list[dict[str, str]] = []
    label_sep = None

    def __init__(self, source: str, label_field: str = "category_id") -> None:
        self.path = Path(source)
        self.label_field = label_field
        self.labelled: bool | None = None  # decided by peeking at the first documents
        self._bounds: array[int] | None = None  # partition boundaries, once a walk has found them all
        if self.path.stat().st_size == 0 or not looks_like_bson(self.path):
            raise ConfigError(f"{self.path} is not a BSON dump (it does not start with a BSON document)")
        self.labelled = self._peek_labelled()
        self.given_splits = not self.labelled

    def _peek_labelled(self) -> bool:
        seen = 0
        for item in self:
            if isinstance(item, Sample):
                if item.label is not None:
                    return True
                seen += 1
                if seen >= PEEK_DOCUMENTS:
                    break
        return False

    def __iter__(self) -> Iterator[Item]:
        return self.read()

    def read(self, span: tuple[int, int] | None = None, splitter: Callable[[str, str], str] | None = None) -> Iterator[Item]:
        """The items of the documents starting in `span` (a range from `partitions`; all by default).
        With a `splitter`, each Sample is made with its split (splitter(product, label)), not copied for it."""
        for buf, document in self._documents(span):
            if isinstance(document, Skip):
                yield document
            else:
                yield from self._document(document, splitter)

    def partitions(self, documents: int = PARTITION_DOCUMENTS) -> Iterator[tuple[int, int]]:
        """Byte ranges of about `documents` documents each, so worker processes share one big file.

        Walks the length prefixes only (about 1 us per document); a range ends only where a document
        verifiably starts. Damage inside a range is found and counted by whoever reads it. The walk's
        boundaries are kept (8 bytes per range), so pack's second pass does not walk again.
        """
        if self._bounds is not None and documents == PARTITION_DOCUMENTS:
            yield from zip(self._bounds, self._bounds[1:])
            return
        bounds = array("q", [0])
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            start = position = count = 0
            while position < len(buf):
                length = plausible(buf, position)
                position = position + length if length else self._resync(buf, position, len(buf))[1]
                count += 1
                if count >= documents and position < len(buf) and self._parse(buf, position):
                    yield start, position
                    bounds.append(position)
                    _release(buf, start, position)
                    start, count = position, 0
            yield start, len(buf)
            bounds.append(len(buf))
        if documents == PARTITION_DOCUMENTS:
            self._bounds = bounds

    def scan(self, span: tuple[int, int] | None = None) -> Iterator[tuple[str | None, str, int]]:
        """(label, group, items) per document, for pack's first pass: no Sample built."""
        for _, document in self._documents(span):
            if isinstance(document, Skip):
                yield None, "", 1
                continue
            fields = document.fields
            imgs = fields.get("imgs")
            label = self._label(fields) if self.labelled else None
            yield label, as_text(fields.get("_id")) or "", max(len(imgs) if isinstance(imgs, list) else 0, 1)

    def _documents(self, span: tuple[int, int] | None) -> Iterator[tuple[mmap.mmap, Document | Skip]]:
        """Each document with its top-level fields, or a Skip for damaged bytes, in file order.

        A length is trusted only once the bytes it frames decode as a document; otherwise the bytes
        from there are damage and we search forward, so a length prefix that overshoots into the next
        document never takes that document with it.
        """
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            position, end = span or (0, len(buf))
            released = position
            while position < end:
                document = self._parse(buf, position)
                if document is None:
                    skip, position = self._resync(buf, position, end)
                    yield buf, skip
                    continue
                yield buf, document
                position = document.end
                if position - released > RELEASE_BYTES:
                    released = _release(buf, released, position)
            _release(buf, released, end)

    @staticmethod
    def _parse(buf: mmap.mmap, start: int) -> Document | None:
        """The document at `start` if its length prefix frames one that decodes, else None."""
        length = plausible(buf, start)
        if not length:
            return None
        try:
            return Document(start, start + length, bson.decode(buf[start:start + length]))
        except (BSONError, ValueError, OverflowError):
            return None

    def _resync(self, buf: mmap.mmap, start: int, end: int) -> tuple[Skip, int]:
        """A Skip for the damaged bytes from `start` and the offset of the next document (at most `end`)."""
        hit = buf.find(_ID_FIELD, start + 6, end + 9)  # up to the _id of a document starting at `end`
        while hit >= 0 and self._parse(buf, hit - 5) is None:
            hit = buf.find(_ID_FIELD, hit + 1, end + 9)
        found = hit - 5 if hit >= 0 else end
        where = f"{self.path.name}@{start}"
        remaining = len(buf) - start
        declared = _INT32.unpack_from(buf, start)[0] if remaining >= 4 else None
        if hit < 0 and end == len(buf) and (declared is None or declared > remaining):
            detail = (f"the last document is cut off: {remaining} bytes left" +
                      (f", its length says {declared}" if declared is not None else ""))
            return Skip("truncated_document", f"offset_{start}", where, detail), found
        detail = (f"length prefix {declared} does not frame a document that decodes; bytes {start}-{found} "
                  "skipped to the next one")
        return Skip("corrupt_document", f"offset_{start}", where, detail), found

    def _label(self, fields: dict[str, Any]) -> str | None:
        """The category id as text; None when it is missing, empty or not an integer (see _no_label)."""
        value = fields.get(self.label_field)
        label = as_text(value)
        label = label.strip() if isinstance(value, str) else label
        return label if label and _INTEGER.fullmatch(label) else None

    def _no_label(self, fields: dict[str, Any], key: str, where: str, product: str) -> Skip:
        value = fields.get(self.label_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            return Skip("missing_label", key, where, f"no {self.label_field}", product)
        return Skip("bad_label", key, where, f"{self.label_field} {repr(value)[:60]} is not an integer", product)

    def _document(self, document: Document, splitter: Callable[[str, str], str] | None = None) -> Iterator[Item]:
        fields, where = document.fields, f"{self.path.name}@{document.start}"
        product = as_text(fields.get("_id"))
        if product is None:
            yield Skip("missing_id", f"offset_{document.start}", where, "no usable _id")
            return
        key = product_key(product, isinstance(fields["_id"], str))
        label = self._label(fields)
        imgs = fields.get("imgs")
        if not isinstance(imgs, list):
            yield Skip("missing_images", key, where, "no imgs array", product)
            return
        if not imgs:
            yield Skip("no_images", key, where, "imgs is empty", product)
            return
        if label is None and self.labelled:
            yield self._no_label(fields, key, where, product)
            return
        label, split = (None, "unlabelled") if self.labelled is False else (label, None)
        if splitter and split is None:
            split = splitter(product, label)
        for index, entry in enumerate(imgs):
            picture = entry.get("picture") if isinstance(entry, dict) else None
            name, source = f"{key}_{index}", f"{where}#{index}"
            if not isinstance(picture, bytes):  # bson Binary of any subtype is bytes
                yield Skip("missing_picture", name, source, "imgs entry without binary picture", product, split)
            else:
                yield Sample(key=name, label=label, group=product, source=source, data=bytes(picture),
                             split=split, meta={"_id": product})
