"""Reading and writing records: JSONL, JSON, Parquet and Hugging Face datasets (a ``save_to_disk`` folder, or a hub
id through ``datasets.load_dataset``, which reads its offline cache when ``HF_HUB_OFFLINE=1``).

Two guarantees every stage relies on:

* A whole-file write goes to a temporary file beside the target and is renamed
  over it only when complete, so a crash never leaves half a file, and an
  error while producing the records leaves no output at all.
* An append (JSONL, one record per line) writes each record with a single
  ``write`` on an ``O_APPEND`` descriptor. If a process was killed mid-line,
  the next writer cuts the torn tail off before appending, and readers in
  ``resume`` mode ignore it, so a stage restarted after ``kill -9`` never sees
  or produces a broken line.

Every row comes with its :class:`~align.errors.Location` (file and 1-based line,
or row for columnar formats) so errors can point at it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from align.errors import BusyError, DataError, DiskFullError, Location

JSON_SUFFIXES = (".json", ".json.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# A hub dataset id (``owner/name``) as datasets.load_dataset takes it; read as one only when no such path exists.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
DEFAULT_SPLIT = "train"


def file_format(path: str | Path) -> str:
    """'jsonl', 'json', 'parquet', 'hf' (a ``save_to_disk`` folder) or 'hub' (a hub id), from the path."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "hf"
    if is_hub_id(path):
        return "hub"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError.at(path, "unknown file type: use .jsonl, .json, .parquet (optionally .gz for JSON) "
                             "or a Hugging Face `save_to_disk` folder")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class Malformed(str):
    """Stands in for a JSONL line that is not valid JSON, when the caller wants to see them all."""


def is_hub_id(path: str | Path) -> bool:
    """Whether ``path`` names a hub dataset: an ``owner/name`` id with no file or folder of that name here."""
    text = str(path)
    return bool(HUB_ID.match(text)) and not Path(text).exists() and not text.lower().endswith(
        JSON_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)


def iter_rows(path: str | Path, *, tolerate_torn_tail: bool = False, yield_malformed: bool = False,
              split: str = DEFAULT_SPLIT) -> Iterator[tuple[Location, Any]]:
    """Yield ``(location, row)`` for every record in a file, in order.

    Malformed JSON raises :class:`DataError` at its line, or with
    ``yield_malformed`` comes through as a :class:`Malformed` message so a
    validator can keep going. With ``tolerate_torn_tail`` a last JSONL line
    without its newline (a writer killed mid-record) is skipped; resumable
    stages read their own output so.
    """
    p = Path(path)
    if is_hub_id(path):
        yield from _iter_dataset(_load_hub(str(path), split), str(path), split)
        return
    if not p.exists():
        raise DataError.at(path, "file does not exist")
    fmt = file_format(p)
    if fmt == "jsonl":
        yield from _iter_jsonl(p, tolerate_torn_tail, yield_malformed)
    elif fmt == "json":
        yield from _iter_json(p)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist(), start=1):
            yield Location(str(p), row=i), row
    else:
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError.at(path, f"not a Hugging Face dataset folder ({exc})") from exc
        yield from _iter_dataset(ds, str(p), split)


def _load_hub(dataset_id: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many kinds: not found, offline, bad split)
        offline = " (offline: only a dataset already in the datasets cache loads)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise DataError.at(dataset_id, f"no such file or folder here, and as a hub dataset id "
                                       f"datasets.load_dataset({dataset_id!r}, split={split!r}) failed{offline}: "
                                       f"{type(exc).__name__}: {exc}") from None


def _iter_dataset(ds: Any, where: str, split: str) -> Iterator[tuple[Location, Any]]:
    """The rows of a Dataset, or of a DatasetDict's ``split`` (an error names the splits there are)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict) and split not in (DEFAULT_SPLIT, str(ds.split)):
        raise DataError.at(where, f"is one dataset ({ds.split or 'no split'}), not split {split!r}: remove --split")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError.at(where, f"dataset has splits {list(ds)}, not {split!r}: choose one with --split / "
                                      "split=")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield Location(f"{where}" if split == DEFAULT_SPLIT else f"{where}[{split}]", row=i), row


def _iter_jsonl(p: Path, tolerate_torn_tail: bool, yield_malformed: bool) -> Iterator[tuple[Location, Any]]:
    with _open_text(p) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if tolerate_torn_tail and not line.endswith("\n"):
                    return
                message = f"malformed JSON ({exc.msg} at column {exc.colno})"
                if yield_malformed:
                    yield Location(str(p), line=number), Malformed(message)
                    continue
                raise DataError.at(p, message, line=number) from None
            yield Location(str(p), line=number), row


def _iter_json(p: Path) -> Iterator[tuple[Location, Any]]:
    """A JSON array of records, each located at the line where it starts.

    ``{"data": [...]}``-style wrappers (one top-level key holding the list) are
    accepted too, as many published datasets use them.
    """
    with _open_text(p) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    if start < len(text) and text[start] == "[":
        yield from _iter_json_array(p, text, start + 1, decoder)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError.at(p, f"malformed JSON ({exc.msg})", line=exc.lineno) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            for i, row in enumerate(lists[0], start=1):
                yield Location(str(p), row=i), row
            return
    raise DataError.at(p, "expected a JSON array of records (or an object holding one list of records)")


def _iter_json_array(p: Path, text: str, pos: int, decoder: json.JSONDecoder) -> Iterator[tuple[Location, Any]]:
    line = 1 + text.count("\n", 0, pos)
    counted_to = pos
    pos = _skip_ws(text, pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError.at(p, f"malformed JSON ({exc.msg})", line=exc.lineno) from None
        yield Location(str(p), line=line), row
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        bad_line = 1 + text.count("\n", 0, pos)
        raise DataError.at(p, "malformed JSON (expected ',' or ']' between records)", line=bad_line)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as exc:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        if is_out_of_space(exc):
            raise DiskFullError(f"{target}: cannot write it ({exc.strerror}); the file as it was before is "
                                "untouched and no temporary file is left: free some space and run again") from exc
        raise


# A full disk, a full quota, or a file-size limit (ulimit -f): a write that can never succeed as it is.
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE


class ExclusiveLock:
    """Holds ``path`` (a lock file, created) for one process, or fails at once when another holds it: two align
    processes writing one output or run dir would interleave rows or checkpoints. The lock goes with the process
    (the kernel drops it at exit, ``kill -9`` included), so a stopped run never leaves a stale one behind."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = -1
            raise BusyError(busy_message(what, holder)) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "ExclusiveLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def busy_message(what: str, holder: str = "") -> str:
    return (f"{what} is being written by another align process{f' (pid {holder})' if holder else ''}: wait for "
            "it to finish or stop it, then run again (it carries on where that one stopped)")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs: one process at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sort_finished_jsonl(path: str | Path, key: Callable[[Any], Any]) -> bool:
    """Put a finished JSONL file's lines in ``key`` order (stable), when they are not already, with one atomic
    rename: resumable stages append in the order work completes (batches, retries, a resumed run's leftovers), and
    readers expect the input's order. Lines move byte for byte; a kill during the rewrite leaves the file as it
    was. Returns whether it rewrote."""
    path = Path(path)
    if not path.exists():
        return False
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    try:
        keys = [key(json.loads(line)) for line in lines]
    except json.JSONDecodeError:  # a torn line: not a finished file, left as it is for the next run to mend
        return False
    if all(a <= b for a, b in zip(keys, keys[1:])):
        return False
    order = sorted(range(len(lines)), key=keys.__getitem__)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in order),
                       encoding="utf-8")
    return True


def dumps(record: Any) -> str:
    """One record as one JSON line (no newline inside, UTF-8 kept readable)."""
    if hasattr(record, "to_json"):
        record = record.to_json()
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_records(path: str | Path, records: Iterable[Any]) -> int:
    """Write all records to ``path`` atomically, in the format its suffix names. Returns the count.

    ``records`` may be a generator that raises part-way (for example on bad
    input): then nothing is written and no temporary file is left.
    """
    target = Path(path)
    fmt = "hf" if target.suffix == "" and not target.name.endswith(".gz") else file_format(target)
    rows = (r.to_json() if hasattr(r, "to_json") else r for r in records)
    if fmt == "jsonl":
        count = 0
        opener = gzip.open if target.name.endswith(".gz") else open
        with atomic_path(target) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
                count += 1
        return count
    materialised = list(rows)
    if fmt == "json":
        opener = gzip.open if target.name.endswith(".gz") else open
        with atomic_path(target) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
            json.dump(materialised, f, ensure_ascii=False, indent=1)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(target) as tmp:
            pq.write_table(pa.Table.from_pylist(materialised), tmp)
    else:
        import datasets

        with atomic_path(target) as tmp:
            tmp.unlink()
            datasets.Dataset.from_list(materialised).save_to_disk(str(tmp))
    return len(materialised)


def write_json(path: str | Path, data: Any) -> None:
    """A JSON document (run metadata, metrics), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_of(path: str | Path) -> str:
    """A file's SHA-256, or a folder's (its files' relative names and contents, in order)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            digest.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class JsonlAppender:
    """Appends one record per line, each in a single ``write``; safe to kill at any moment.

    Opening repairs a torn tail left by a killed writer (bytes after the last
    newline) so the file stays valid JSONL, and takes the file for this writer
    alone: another process appending to it meanwhile gets a :class:`BusyError`.
    Use as a context manager.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:  # one writer at a time: a second would interleave its lines with ours (dropped at close or exit)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BusyError(busy_message(str(self.path))) from None
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        keep = size
        chunk = 1 << 16
        while keep > 0:
            start = max(0, keep - chunk)
            data = os.pread(self._fd, keep - start, start)
            if keep == size and data.endswith(b"\n"):
                return
            newline = data.rfind(b"\n")
            if newline != -1:
                os.ftruncate(self._fd, start + newline + 1)
                return
            keep = start
        os.ftruncate(self._fd, 0)

    def append(self, record: Any) -> None:
        data = memoryview((dumps(record) + "\n").encode("utf-8"))
        try:
            while data:  # a regular file takes it all at once; loop only on a short write
                data = data[os.write(self._fd, data):]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            if is_out_of_space(exc):
                raise DiskFullError(f"{self.path}: cannot append to it ({exc.strerror}); the lines written before "
                                    "are intact, and a partly written last one is cut off when the stage runs "
                                    "again: free some space and run it again") from exc
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
