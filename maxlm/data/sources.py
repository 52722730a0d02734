"""Document sources: random-access collections of text documents, named by a spec string.

A source has ``len(src)`` and ``src[i] -> str`` (one document), so ``grain.MapDataset.source``
takes it directly. Specs:

  text:PATH_GLOB            plain UTF-8 text; one document per file (``text_split='file'``) or
                            per block separated by blank lines (``text_split='blank_line'``)
  jsonl:PATH_GLOB[#FIELD]   JSON Lines (``.gz`` allowed); the document is ``record[FIELD]``
                            (default field ``text``)
  tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR][#FIELD]
                            a prepared TFDS dataset in array_record format (no download, no
                            TensorFlow); SPLIT defaults to ``train`` and may be sliced
                            (``train[:90%]``); FIELD defaults to ``text``
  arrayrecord:PATH_GLOB[#FIELD]
                            ArrayRecord files. Convention: without ``#FIELD`` every record is the
                            UTF-8 text of one document; with ``#FIELD`` every record is a UTF-8
                            JSON object and the document is ``record[FIELD]``
  builtin:NAME[#FIELD]      a corpus vendored in the package: ``tinyshakespeare`` (one document)
                            or ``hh_rlhf_harmless_test`` (JSONL with fields ``chosen``/``rejected``)

Text and JSONL sources are read into memory at construction; TFDS and ArrayRecord sources stay
on disk and are read on access. Bad input (a missing file, an empty corpus, non-UTF-8 bytes, a
JSONL line that is not a JSON object or lacks the field) raises an error naming the file and the
line or record, or with ``on_bad_record='skip'`` is skipped, counted in ``source.report`` and
logged. Empty or whitespace-only documents are dropped and counted (``empty``), except in a
lazy source read with ``on_bad_record='error'``, which returns them as they are.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import importlib.resources
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

from absl import logging
import numpy as np

OnBadRecord = Literal["error", "skip"]
TextSplit = Literal["file", "blank_line"]

SCHEMES = ("text", "jsonl", "tfds", "arrayrecord", "builtin")
BUILTIN_CORPORA = {
    # name: (asset file, scheme used to read it)
    "tinyshakespeare": ("tinyshakespeare.txt", "text"),
    "hh_rlhf_harmless_test": ("hh_rlhf_harmless_test.jsonl.gz", "jsonl"),
}
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


class DocumentSource(Protocol):
    """What the pipelines need from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


class BadRecordError(ValueError):
    """A record that cannot be turned into a document; the message names file and line/record."""


def asset_path(name: str) -> str:
    """Filesystem path of a file vendored in ``maxlm/data/assets`` (works from an installed package)."""
    resource = importlib.resources.files("maxlm.data").joinpath("assets", name)
    if not resource.is_file():
        raise FileNotFoundError(f"no vendored asset named {name!r} in maxlm/data/assets")
    return str(resource)


def expand_glob(pattern: str, *, what: str) -> list[str]:
    """Sorted files matching ``pattern``; FileNotFoundError when there are none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
    return paths


class _Skips:
    """Counts skipped records per reason; raises instead when on_bad_record='error'."""

    def __init__(self, on_bad_record: OnBadRecord):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.on_bad_record = on_bad_record
        self.counts: collections.Counter[str] = collections.Counter()

    def bad(self, reason: str, message: str) -> None:
        if self.on_bad_record == "error":
            raise BadRecordError(f"{message} (pass on_bad_record='skip' to skip such records)")
        if self.counts[reason] < 5:
            logging.warning("skipping bad record: %s", message)
        self.counts[reason] += 1


def _decode(data: bytes, where: str, skips: _Skips) -> str | None:
    """UTF-8 decode, or None (counted) / BadRecordError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        skips.bad("non_utf8", f"{where}: line {line}: invalid UTF-8 byte at offset {e.start}")
        return None


class InMemorySource:
    """Documents held in a list; ``report`` says how many were read and skipped."""

    def __init__(self, docs: list[str], *, spec: str, skipped: dict[str, int]):
        if not docs:
            detail = f" (skipped: {dict(skipped)})" if skipped else ""
            raise ValueError(f"source {spec!r} is an empty corpus: no non-empty documents{detail}")
        self._docs = docs
        self.spec = spec
        self.report = {"spec": spec, "documents": len(docs), "skipped": dict(skipped)}
        logging.info("source %s: %d documents, skipped %s", spec, len(docs), dict(skipped))

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        return self._docs[index]

    def __repr__(self) -> str:
        return f"InMemorySource({self.spec!r}, documents={len(self._docs)})"


def _text_documents(pattern: str, text_split: TextSplit, skips: _Skips) -> Iterator[str]:
    if text_split not in ("file", "blank_line"):
        raise ValueError(f"text_split must be 'file' or 'blank_line', got {text_split!r}")
    for path in expand_glob(pattern, what="text source"):
        with open(path, "rb") as f:
            data = f.read()
        if text_split == "file":
            blocks = [(0, data)]
        else:
            starts = [0] + [m.end() for m in _BLANK_LINE.finditer(data)]
            ends = [m.start() for m in _BLANK_LINE.finditer(data)] + [len(data)]
            blocks = [(s, data[s:e]) for s, e in zip(starts, ends)]
        for offset, block in blocks:
            first_line = data[:offset].count(b"\n") + 1
            text = _decode(block, f"{path} (block from line {first_line})" if offset else path, skips)
            if text is not None:
                yield text


def _open_lines(path: str) -> Iterator[bytes]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def load_jsonl(
    pattern: str, *, fields: Sequence[str] = ("text",), on_bad_record: OnBadRecord = "error"
) -> list[dict[str, Any]]:
    """Reads JSON-object lines from files matching ``pattern`` (``.gz`` allowed).

    Every record must be a JSON object holding all ``fields`` with string values. Blank lines are
    ignored. A bad line raises BadRecordError naming file and line, or with
    ``on_bad_record='skip'`` is left out and logged with the counts per reason.
    """
    skips = _Skips(on_bad_record)
    records = _jsonl_records(pattern, fields, skips)
    if skips.counts:
        logging.warning("jsonl %s: skipped %s", pattern, dict(skips.counts))
    return records


def _jsonl_records(pattern: str, fields: Sequence[str], skips: _Skips) -> list[dict[str, Any]]:
    records = []
    for path in expand_glob(pattern, what="jsonl source"):
        for lineno, raw in enumerate(_open_lines(path), start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, skips)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skips.bad("invalid_json", f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                skips.bad("invalid_json", f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            missing = [k for k in fields if k not in record]
            if missing:
                skips.bad("missing_field", f"{where}: missing field {missing[0]!r} (keys: {sorted(record)})")
                continue
            wrong = [k for k in fields if not isinstance(record[k], str)]
            if wrong:
                skips.bad("missing_field", f"{where}: field {wrong[0]!r} is {type(record[wrong[0]]).__name__}, not a string")
                continue
            records.append(record)
    return records


class _RecordSource:
    """Lazy documents over random-access record readers (TFDS, ArrayRecord).

    With ``on_bad_record='error'`` records are decoded on access, a bad one raises and an empty
    one is returned as it is (the pipelines drop empty documents); with ``'skip'`` all records are
    scanned once at construction and only the good, non-empty ones are kept.
    """

    def __init__(self, readers: list[tuple[str, Any]], decode, *, spec: str, on_bad_record: OnBadRecord):
        self.spec = spec
        self._readers = readers  # (name for messages, random-access reader)
        self._decode = decode  # (raw record, where, skips) -> str | None
        self._ends = list(np.cumsum([len(r) for _, r in readers]))
        skips = _Skips(on_bad_record)
        self._index: np.ndarray | None = None
        if on_bad_record == "skip":
            texts = ((i, self._read(i, skips)) for i in range(self.num_records))
            good = [i for i, text in texts if text is not None and text.strip()]
            if self.num_records - len(good) > sum(skips.counts.values()):
                skips.counts["empty"] = self.num_records - len(good) - sum(skips.counts.values())
            self._index = np.asarray(good, dtype=np.int64)
        if len(self) == 0:
            raise ValueError(f"source {spec!r} is an empty corpus: no non-empty records (skipped: {dict(skips.counts)})")
        self.report = {"spec": spec, "documents": len(self), "skipped": dict(skips.counts)}
        logging.info("source %s: %d documents, skipped %s", spec, len(self), dict(skips.counts))

    @property
    def num_records(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def _read(self, i: int, skips: _Skips) -> str | None:
        r = bisect.bisect_right(self._ends, i)
        name, reader = self._readers[r]
        local = i - (int(self._ends[r - 1]) if r else 0)
        return self._decode(reader[local], f"{name}: record {local}", skips)

    def __len__(self) -> int:
        return self.num_records if self._index is None else len(self._index)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents in {self.spec!r}")
        index %= len(self)
        i = index if self._index is None else int(self._index[index])
        text = self._read(i, _Skips("error"))
        assert text is not None
        return text

    def __repr__(self) -> str:
        return f"RecordSource({self.spec!r}, documents={len(self)})"


def _json_field_decoder(field: str | None):
    """Decoder for raw records: UTF-8 text, or UTF-8 JSON objects whose ``field`` is the text."""

    def decode(raw: bytes, where: str, skips: _Skips) -> str | None:
        text = _decode(raw, where, skips)
        if text is None or field is None:
            return text
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            skips.bad("invalid_json", f"{where}: not valid JSON ({e.msg})")
            return None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            skips.bad("missing_field", f"{where}: no string field {field!r}")
            return None
        return record[field]

    return decode


def _tfds_source(rest: str, spec: str, on_bad_record: OnBadRecord) -> _RecordSource:
    m = re.fullmatch(r"(?P<name>[^:@#]+)(?::(?P<split>[^@#]+))?(?:@(?P<data_dir>[^#]+))?(?:#(?P<field>.+))?", rest)
    if not m:
        raise ValueError(f"bad tfds spec {spec!r}: expected tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR][#FIELD]")
    import tensorflow_datasets as tfds  # slow import; only when used

    name, split = m["name"], m["split"] or "train"
    field = m["field"] or "text"
    data_dir = os.path.expanduser(m["data_dir"]) if m["data_dir"] else None
    try:
        reader = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, AssertionError)
        raise FileNotFoundError(
            f"tfds source {spec!r}: cannot open {name} split {split!r} in data_dir={data_dir!r}: "
            f"{str(e).splitlines()[0]}. It must be prepared beforehand in array_record format."
        ) from e

    def decode(record: dict, where: str, skips: _Skips) -> str | None:
        if field not in record:
            skips.bad("missing_field", f"{where}: missing field {field!r} (features: {sorted(record)})")
            return None
        value = record[field]
        return _decode(value, where, skips) if isinstance(value, bytes) else str(value)

    return _RecordSource([(f"tfds {name}[{split}]", reader)], decode, spec=spec, on_bad_record=on_bad_record)


def _arrayrecord_source(rest: str, spec: str, on_bad_record: OnBadRecord) -> _RecordSource:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    pattern, _, field = rest.partition("#")
    readers = [(p, ArrayRecordDataSource([p])) for p in expand_glob(pattern, what="arrayrecord source")]
    return _RecordSource(readers, _json_field_decoder(field or None), spec=spec, on_bad_record=on_bad_record)


def make_source(
    spec: str, *, on_bad_record: OnBadRecord = "error", text_split: TextSplit = "file"
) -> DocumentSource:
    """Opens the document source named by ``spec`` (see the module docstring for the schemes)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(
            f"unknown source spec {spec!r}: expected SCHEME:ARGS with scheme one of "
            + ", ".join(f"{s}:" for s in SCHEMES)
        )
    if scheme == "builtin":
        name, _, field = rest.partition("#")
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown builtin corpus {name!r} in {spec!r}; known: {sorted(BUILTIN_CORPORA)}")
        filename, scheme = BUILTIN_CORPORA[name]
        rest = asset_path(filename) + (f"#{field}" if field else "")
    if scheme == "tfds":
        return _tfds_source(rest, spec, on_bad_record)
    if scheme == "arrayrecord":
        return _arrayrecord_source(rest, spec, on_bad_record)

    skips = _Skips(on_bad_record)
    if scheme == "text":
        docs = list(_text_documents(rest, text_split, skips))
    else:  # jsonl
        pattern, _, field = rest.partition("#")
        field = field or "text"
        docs = [r[field] for r in _jsonl_records(pattern, (field,), skips)]
    kept = [d for d in docs if d.strip()]
    skipped = dict(skips.counts)
    if len(kept) < len(docs):
        skipped["empty"] = len(docs) - len(kept)
    return InMemorySource(kept, spec=spec, skipped=skipped)


def infer_spec(path_or_spec: str) -> str:
    """A source spec for a plain path: ``*.jsonl[.gz][#field]`` becomes ``jsonl:``, others ``text:``.

    Strings that already start with a known scheme are returned unchanged.
    """
    scheme, sep, _ = path_or_spec.partition(":")
    if sep and scheme in SCHEMES:
        return path_or_spec
    path = path_or_spec.partition("#")[0]
    if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return f"jsonl:{path_or_spec}"
    return f"text:{path_or_spec}"
