"""MongoDB BSON dumps (Cdiscount's train.bson / test.bson): one Sample per picture, never a copy of it.

A dump is BSON documents back to back, each starting with its int32 length. We walk those length
prefixes over an mmap and read only each document's structure: `_id`, `category_id` and where each
`imgs[i].picture` sits in the file. A Sample carries that byte range (`path` + `span`) instead of the
bytes, so the worker processes read their own ranges of the one big file (os.pread) and the main
process never copies a picture. Hand-written because pymongo's `bson` decoder returns values, not
their offsets; its documents are also what the tests build dumps with.

Damage is a counted Skip, never the end of the run: a length prefix that is impossible, runs past
the end of the file or does not end on the document terminator is skipped by searching forward for
the next document start (`<int32 length><type>_id\\0`; mongodump always writes `_id` first).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from shardtool.errors import ConfigError
from shardtool.readers.common import make_key
from shardtool.sample import Item, Sample, Skip

MAX_DOCUMENT = 64 << 20  # MongoDB's own limit is 16 MiB; anything past this is a broken prefix
_INT32, _INT64, _DOUBLE = struct.Struct("<i"), struct.Struct("<q"), struct.Struct("<d")
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0xFF: 0, 0x7F: 0}
# types whose value starts with an int32 length: how many bytes precede the part that length counts
_LENGTH_PREFIXED = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x05: 5, 0x03: 0, 0x04: 0, 0x0F: 0}
_ID_FIELD = b"_id\x00"
PEEK_DOCUMENTS = 100  # documents read to decide whether a dump is labelled
RELEASE_BYTES = 16 << 20
PARTITION_DOCUMENTS = 256


class Corrupt(Exception):
    """The document's structure does not hold together (detail in the message)."""


class Element(NamedTuple):
    kind: int
    name: str
    start: int  # first byte of the value
    end: int  # one past its last byte


class Document(NamedTuple):
    start: int
    end: int
    fields: dict[str, Element]


def elements(buf: mmap.mmap, start: int, end: int) -> Iterator[Element]:
    """The elements of the document (or array) occupying buf[start:end], with bounds checked."""
    position = start + 4
    while position < end - 1:
        kind = buf[position]
        name_end = buf.find(b"\x00", position + 1, end)
        if name_end < 0:
            raise Corrupt(f"unterminated field name at byte {position}")
        name = buf[position + 1:name_end].decode("utf-8", "replace")
        position = _value_end(buf, kind, name_end + 1, end)
        yield Element(kind, name, name_end + 1, position)
    if position != end - 1 or buf[position] != 0:
        raise Corrupt(f"document at byte {start} does not end where its length says")


def _value_end(buf: mmap.mmap, kind: int, value: int, end: int) -> int:
    if kind in _FIXED:
        stop = value + _FIXED[kind]
    elif kind in _LENGTH_PREFIXED or kind == 0x0C:
        if value + 4 > end:
            raise Corrupt(f"value at byte {value} runs past its document")
        (length,) = _INT32.unpack_from(buf, value)
        if length < 0:
            raise Corrupt(f"negative length at byte {value}")
        stop = value + length + (_LENGTH_PREFIXED[kind] if kind != 0x0C else 16)  # DBPointer: string + 12
    elif kind == 0x0B:  # regex: two C strings
        first = buf.find(b"\x00", value, end)
        stop = buf.find(b"\x00", first + 1, end) + 1 if first >= 0 else 0
    else:
        raise Corrupt(f"unknown BSON type 0x{kind:02x} at byte {value - 1}")
    if not value <= stop <= end - 1:
        raise Corrupt(f"value at byte {value} runs past its document")
    return stop


def scalar(buf: mmap.mmap, element: Element, strip: bool = True) -> str | None:
    """An id-like value as text: ints, integral doubles, strings, ObjectIds; None for anything else."""
    kind, start = element.kind, element.start
    if kind == 0x10:
        return str(_INT32.unpack_from(buf, start)[0])
    if kind == 0x12:
        return str(_INT64.unpack_from(buf, start)[0])
    if kind == 0x01:
        number = _DOUBLE.unpack_from(buf, start)[0]
        return str(int(number)) if number.is_integer() else str(number)
    if kind == 0x02:
        text = buf[start + 4:element.end - 1].decode("utf-8", "surrogateescape")
        return (text.strip() if strip else text) or None
    if kind == 0x07:
        return buf[start:element.end].hex()
    return None


def product_key(product: str, kind: int) -> str:
    """The sample-key stem of an _id: the id itself when safe, else sanitised + a hash (make_key).

    A string id that reads as a number gets the hash too, so the string "7" and the int 7 (distinct
    _ids to MongoDB) never share tar member names.
    """
    if kind == 0x02 and re.fullmatch(r"-?\d+", product):
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
    return 5 <= length <= min(MAX_DOCUMENT, path.stat().st_size) and (head[4] in _FIXED or head[4] in _LENGTH_PREFIXED)


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

    def read(self, span: tuple[int, int] | None = None) -> Iterator[Item]:
        """The items of the documents starting in `span` (a range from `partitions`; all by default)."""
        for buf, document in self._documents(span):
            if isinstance(document, Skip):
                yield document
            else:
                yield from self._document(buf, document)

    def partitions(self, documents: int = PARTITION_DOCUMENTS) -> Iterator[tuple[int, int]]:
        """Byte ranges of about `documents` documents each, so worker processes share one big file.

        Walks the length prefixes only (about 1 us per document); a range ends only where a document
        verifiably starts. Damage inside a range is found and counted by whoever reads it.
        """
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            start = position = count = 0
            while position < len(buf):
                length = plausible(buf, position)
                position = position + length if length else self._resync(buf, position, len(buf))[1]
                count += 1
                if count >= documents and position < len(buf) and self._parse(buf, position):
                    yield start, position
                    start, count = position, 0
            yield start, len(buf)

    def scan(self, span: tuple[int, int] | None = None) -> Iterator[tuple[str | None, str, int]]:
        """(label, group, items) per document, for pack's first pass: no Sample built, no picture parsed."""
        for buf, document in self._documents(span):
            if isinstance(document, Skip):
                yield None, "", 1
                continue
            imgs = document.fields.get("imgs")
            try:
                pictures = sum(1 for _ in elements(buf, imgs.start, imgs.end)) if imgs and imgs.kind == 0x04 else 0
            except Corrupt:
                pictures = 0
            label = self._label(buf, document.fields)
            product = scalar(buf, document.fields["_id"], strip=False) if "_id" in document.fields else ""
            yield (label if self.labelled else None), product or "", max(pictures, 1)

    def _documents(self, span: tuple[int, int] | None) -> Iterator[tuple[mmap.mmap, Document | Skip]]:
        """Each document with its top-level fields, or a Skip for damaged bytes, in file order.

        A length is trusted only once the fields it frames end exactly on its terminator; otherwise the
        bytes from there are damage and we search forward, so a length prefix that overshoots into the
        next document never takes that document with it.
        """
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            position, end = span or (0, len(buf))
            released = position - position % mmap.PAGESIZE
            while position < end:
                document = self._parse(buf, position)
                if document is None:
                    skip, position = self._resync(buf, position, end)
                    yield buf, skip
                    continue
                yield buf, document
                position = document.end
                if position - released > RELEASE_BYTES:  # pages we walked past leave our RSS (not the page cache)
                    done = position - position % mmap.PAGESIZE
                    buf.madvise(mmap.MADV_DONTNEED, released, done - released)
                    released = done

    @staticmethod
    def _parse(buf: mmap.mmap, start: int) -> Document | None:
        length = plausible(buf, start)
        if not length:
            return None
        try:
            return Document(start, start + length, {e.name: e for e in elements(buf, start, start + length)})
        except Corrupt:
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
        detail = f"length prefix {declared} does not frame a document; bytes {start}-{found} skipped to the next one"
        return Skip("corrupt_document", f"offset_{start}", where, detail), found

    def _label(self, buf: mmap.mmap, fields: dict[str, Element]) -> str | None:
        return scalar(buf, fields[self.label_field]) if self.label_field in fields else None

    def _document(self, buf: mmap.mmap, document: Document) -> Iterator[Item]:
        start, fields = document.start, document.fields
        where = f"{self.path.name}@{start}"
        imgs = fields.get("imgs")
        try:
            pictures = list(elements(buf, imgs.start, imgs.end)) if imgs and imgs.kind == 0x04 else None
        except Corrupt as error:
            yield Skip("corrupt_document", f"offset_{start}", where, str(error))
            return
        product = scalar(buf, fields["_id"], strip=False) if "_id" in fields else None
        if product is None:
            yield Skip("missing_id", f"offset_{start}", where, "no usable _id")
            return
        key = product_key(product, fields["_id"].kind)
        label = self._label(buf, fields)
        if pictures is None:
            yield Skip("missing_images", key, where, "no imgs array", product)
            return
        if not pictures:
            yield Skip("no_images", key, where, "imgs is empty", product)
            return
        if label is None and self.labelled:
            yield Skip("missing_label", key, where, f"no {self.label_field}", product)
            return
        if self.labelled is False:
            label, split = None, "unlabelled"
        else:
            split = None
        for index, entry in enumerate(pictures):
            yield self._picture(buf, entry, f"{key}_{index}", product, label, split, f"{where}#{index}")

    def _picture(self, buf: mmap.mmap, entry: Element, key: str, product: str, label: str | None,
                 split: str | None, where: str) -> Item:
        picture = None
        if entry.kind == 0x03:
            try:
                picture = next((e for e in elements(buf, entry.start, entry.end) if e.name == "picture"), None)
            except Corrupt as error:
                return Skip("corrupt_document", key, where, str(error), product, split)
        if picture is None or picture.kind != 0x05:
            return Skip("missing_picture", key, where, "imgs entry without binary picture", product, split)
        span = (picture.start + 5, picture.end - picture.start - 5)
        return Sample(key=key, label=label, group=product, source=where, path=str(self.path), span=span,
                      split=split, meta={"_id": product})
