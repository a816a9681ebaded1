"""Two align processes on one output or run dir: the second stops at once with a clear message, writes nothing, and
the first carries on; a killed holder leaves no stale lock. Real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.data.io import ExclusiveLock, JsonlAppender
from align.errors import BusyError

# A child that takes a lock (or opens an appender and writes one line) and then waits to be killed.
HOLD = """
import sys, time
from align.data.io import ExclusiveLock, JsonlAppender
kind, path = sys.argv[1], sys.argv[2]
held = ExclusiveLock(path, "x") if kind == "lock" else JsonlAppender(path)
if kind == "append":
    held.append({"writer": "first"})
print("holding", flush=True)
time.sleep(120)
"""


def hold(kind: str, path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "holding"
    return child


@pytest.mark.reliability
def test_a_second_appender_to_the_same_file_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "candidates.jsonl"
    first = hold("append", out)
    try:
        with pytest.raises(BusyError, match=f"{out} is being written by another align process"):
            JsonlAppender(out)
        assert [json.loads(line) for line in out.read_text().splitlines()] == [{"writer": "first"}]
    finally:
        first.kill()
        first.wait()
    with JsonlAppender(out) as again:  # the killed holder's lock went with it
        again.append({"writer": "second"})
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.reliability
def test_a_run_dir_in_use_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    lock = tmp_path / "run" / ".lock"
    first = hold("lock", lock)
    try:
        with pytest.raises(BusyError, match=rf"run dir .* another align process \(pid {first.pid}\)"):
            ExclusiveLock(lock, f"run dir {tmp_path / 'run'}")
    finally:
        first.send_signal(9)
        first.wait()
    with ExclusiveLock(lock, "run dir"):
        assert lock.read_text() == str(os.getpid())


@pytest.mark.reliability
def test_align_train_refuses_a_run_dir_another_process_trains_in(tmp_path: Path, tiny_model_dir: Path) -> None:
    import align.train
    from align.data.io import write_records
    from tests.test_train import _pairs

    pairs = tmp_path / "pairs.jsonl"
    write_records(pairs, _pairs(8))
    first = hold("lock", tmp_path / "run" / ".lock")
    try:
        with pytest.raises(BusyError, match="run dir .*run is being written by another align process"):
            align.train.dpo(model=str(tiny_model_dir), data=str(pairs), output_dir=str(tmp_path / "run"),
                            max_steps=1, per_device_train_batch_size=2)
    finally:
        first.kill()
        first.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # refused before writing anything
