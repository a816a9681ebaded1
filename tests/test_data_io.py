"""Readers and writers: formats, locations, atomic writes, kill-safe appends."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.data.io import JsonlAppender, iter_rows, sort_finished_jsonl, write_records
from align.errors import DataError

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.parquet", "x.jsonl.gz", "x.json.gz", "hf_folder"])
def test_round_trip_every_format(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_records(path, ROWS) == 2
    assert [row for _, row in iter_rows(path)] == ROWS


def test_json_array_rows_are_located_at_their_starting_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3},\n  {"a": 4}\n]\n')
    assert [(loc.line, row["a"]) for loc, row in iter_rows(path)] == [(2, 1), (4, 2), (6, 4)]


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed JSON"):
        list(iter_rows(path))


def test_missing_file_and_unknown_suffix_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(iter_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        list(iter_rows(tmp_path / "x.csv"))


def test_failed_write_leaves_old_file_intact_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_records(path, ROWS)
    before = path.read_bytes()

    def exploding():
        yield ROWS[0]
        raise DataError.at("in.jsonl", "bad row", line=2)

    with pytest.raises(DataError):
        write_records(path, exploding())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_appender_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "text": "half wri')  # a writer killed mid-line
    assert [row["i"] for _, row in iter_rows(path, tolerate_torn_tail=True)] == [0, 1]
    with JsonlAppender(path) as out:
        out.append({"i": 2})
    assert [row["i"] for _, row in iter_rows(path)] == [0, 1, 2]


@pytest.mark.reliability
def test_appender_survives_sigkill_mid_stream(tmp_path: Path) -> None:
    """A real process appending as fast as it can, killed with SIGKILL: every line is whole."""
    path = tmp_path / "out.jsonl"
    code = (
        "import sys; from align.data.io import JsonlAppender\n"
        "w = JsonlAppender(sys.argv[1])\n"
        "for i in range(10**9): w.append({'i': i, 'pad': 'x' * 5000})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    while not path.exists() or path.stat().st_size < 2_000_000:
        assert proc.poll() is None, "the writer process died on its own"
    proc.kill()
    proc.wait()
    with JsonlAppender(path):  # reopening repairs whatever the kill left
        pass
    rows = [row for _, row in iter_rows(path)]
    assert rows and [r["i"] for r in rows] == list(range(len(rows)))
    assert path.read_bytes().endswith(b"\n")


def test_gzip_jsonl_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    assert [row for _, row in iter_rows(path)] == [ROWS[0]]
    assert os.path.getsize(path) > 0


def test_a_finished_file_is_put_in_input_order_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    lines = ['{"id": "b", "n": 1}\n', '{"id":"a","x":"é"}\n', '{"id": "zz"}\n', '{"id": "b", "n": 2}\n']
    path.write_text("".join(lines), encoding="utf-8")
    place = {"a": 0, "b": 1}
    assert sort_finished_jsonl(path, lambda row: place.get(row["id"], 2))
    # stable (b's rows keep their order), unknown ids last, each line exactly as it was written
    assert path.read_text(encoding="utf-8") == "".join([lines[1], lines[0], lines[3], lines[2]])
    assert not sort_finished_jsonl(path, lambda row: place.get(row["id"], 2))  # already in order: untouched
    path.write_text('{"id": "b"}\n{"id": "a"}\n{"id": "a", "torn', encoding="utf-8")
    assert not sort_finished_jsonl(path, lambda row: place[row["id"]])  # not finished: left for the next run
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temp file left behind


# A child whose files may not grow past LIMIT bytes (`ulimit -f`): the kernel refuses the write (EFBIG), as a full
# disk would (ENOSPC), so nothing here is simulated in Python.
FULL_DISK = """
import resource, signal, sys
from align.data.io import JsonlAppender, write_records
from align.errors import DiskFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
kind, path = sys.argv[1], sys.argv[2]
try:
    if kind == "whole":
        write_records(path, [{"n": i, "text": "x" * 100} for i in range(200)])
    else:
        with JsonlAppender(path) as out:
            for i in range(200):
                out.append({"n": i, "text": "x" * 100})
except DiskFullError as exc:
    print(exc)
    sys.exit(3)
"""


def run_with_full_disk(kind: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FULL_DISK, kind, str(path)], capture_output=True, text=True)


@pytest.mark.reliability
def test_a_full_disk_leaves_the_earlier_file_whole_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_records(path, [{"n": "earlier"}])
    before = path.read_bytes()
    done = run_with_full_disk("whole", path)
    assert done.returncode == 3, done.stderr
    assert f"{path}: cannot write it (File too large); the file as it was before is untouched" in done.stdout
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


@pytest.mark.reliability
def test_a_full_disk_mid_append_keeps_every_whole_line_and_the_next_run_mends_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "candidates.jsonl"
    done = run_with_full_disk("append", path)
    assert done.returncode == 3, done.stderr
    assert f"{path}: cannot append to it (File too large); the lines written before are intact" in done.stdout
    written = [row for _, row in iter_rows(path, tolerate_torn_tail=True)]
    assert written == [{"n": i, "text": "x" * 100} for i in range(len(written))] and len(written) > 10
    with JsonlAppender(path) as out:  # the next run: the torn tail is cut, then it appends
        out.append({"n": "next"})
    assert [row["n"] for _, row in iter_rows(path)][-2:] == [len(written) - 1, "next"]
