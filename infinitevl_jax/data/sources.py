"""Random-access sources of raw sharegpt records: JSON/JSONL files, ArrayRecord files, TFDS data sources.

Every item is a ``RawRecord``: where it came from (source name and 1-based line or record number) and either the
text of the record or an error. Parsing happens in the per-record transform, so that a malformed line is counted
and skipped there instead of breaking the source. All sources are picklable (they travel to grain workers).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class RawRecord:
    source: str
    line: int  # 1-based line (JSONL), element (JSON list) or record number (ArrayRecord/TFDS)
    text: str | None = None  # JSON text of the record, parsed by the transform
    record: dict | None = None  # an already-parsed record (JSON lists, TFDS)
    error: str | None = None  # why the record could not even be read
    media_root: str | None = None


def expand_paths(path: str | os.PathLike, suffixes: Sequence[str]) -> list[str]:
    """A file, a directory (its files with one of ``suffixes``, sorted) or a glob pattern."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(tuple(suffixes)))
    elif any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
    else:
        found = [path]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files at {path}")
    return found


class JsonSource:
    """Records of ``.jsonl`` files (one JSON object per line; blank lines ignored) and ``.json`` files (a list).

    Line offsets are indexed once at construction; lines are read lazily, so large JSONL files cost little memory.
    """

    def __init__(self, path: str | os.PathLike, media_root: str | os.PathLike | None = None, name: str | None = None):
        self.files = expand_paths(path, (".jsonl", ".json"))
        self.media_root = os.fspath(media_root) if media_root is not None else None
        self.name = name
        # One entry per record: (file index, line, byte start, byte end) or (file index, element, -1, element index).
        self._index: list[tuple[int, int, int, int]] = []
        self._lists: dict[int, list] = {}
        self._list_errors: dict[int, str] = {}
        for fi, f in enumerate(self.files):
            if f.endswith(".json"):
                self._index_json_list(fi, f)
            else:
                self._index_jsonl(fi, f)

    def _index_jsonl(self, fi: int, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        start, line = 0, 1
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end
            if data[start:end].strip():
                self._index.append((fi, line, start, end))
            start, line = end + 1, line + 1

    def _index_json_list(self, fi: int, path: str) -> None:
        try:
            with open(path) as f:
                items = json.load(f)
            if not isinstance(items, list):
                raise ValueError("top level is not a list of records")
        except (ValueError, UnicodeDecodeError) as e:
            # A broken .json file is one bad record, reported with the parser's message.
            self._list_errors[fi] = f"malformed JSON file: {e}"
            self._index.append((fi, 1, -1, -1))
            return
        self._lists[fi] = items
        for i in range(len(items)):
            self._index.append((fi, i + 1, -1, i))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> RawRecord:
        fi, line, start, end = self._index[index]
        path = self.files[fi]
        source = self.name + ":" + os.path.basename(path) if self.name else path
        root = self.media_root if self.media_root is not None else os.path.dirname(os.path.abspath(path))
        if start < 0:
            if fi in self._list_errors:
                return RawRecord(source, line, error=self._list_errors[fi], media_root=root)
            return RawRecord(source, line, record=self._lists[fi][end], media_root=root)
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        try:
            return RawRecord(source, line, text=raw.decode("utf-8"), media_root=root)
        except UnicodeDecodeError as e:
            return RawRecord(source, line, error=f"not UTF-8: {e}", media_root=root)

    def __repr__(self) -> str:
        return f"JsonSource({len(self.files)} files, {len(self)} records)"


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON sharegpt records (media paths relative to ``media_root``)."""

    def __init__(self, path: str | os.PathLike, media_root: str | os.PathLike, name: str | None = None):
        import grain  # the ``data`` extra

        self.files = expand_paths(path, (".array_record", ".arrayrecord"))
        self._source = grain.sources.ArrayRecordDataSource(self.files)
        self.media_root = os.fspath(media_root)
        self.name = name or os.fspath(path)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        raw = self._source[index]
        try:
            return RawRecord(self.name, index + 1, text=bytes(raw).decode("utf-8"), media_root=self.media_root)
        except UnicodeDecodeError as e:
            return RawRecord(self.name, index + 1, error=f"not UTF-8: {e}", media_root=self.media_root)


class TfdsSource:
    """A ``tensorflow_datasets`` random-access data source converted to sharegpt records by ``to_record``.

    ``to_record(example) -> {"messages": [...], "images": [...], "videos": [...]}``; media may be encoded bytes or
    arrays (the transform accepts both), or paths under ``media_root``.
    """

    def __init__(self, name: str, split: str, to_record: Callable[[dict], dict[str, Any]], data_dir: str | None = None,
                 media_root: str | None = None):
        import tensorflow_datasets as tfds  # the ``tfds`` extra

        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self._to_record = to_record
        self.name = f"tfds:{name}/{split}"
        self.media_root = media_root

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        try:
            record = self._to_record(self._source[index])
        except Exception as e:  # noqa: BLE001 - a conversion failure is one bad record
            return RawRecord(self.name, index + 1, error=f"conversion failed: {e!r}", media_root=self.media_root)
        return RawRecord(self.name, index + 1, record=record, media_root=self.media_root)
