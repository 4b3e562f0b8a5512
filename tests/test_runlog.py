"""common.RunLog: a run's lines reach the shared log as one block, even with another writer running."""

import subprocess
import sys

import pytest

from conftest import REPO

WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from common import RunLog
log = RunLog(sys.argv[1])
for i in range(15):
    log.write(f"{{sys.argv[2]}} line {{i}}")
    time.sleep(0.01)
log.close()
"""


@pytest.mark.slow
def test_two_writers_at_once_write_whole_blocks(tmp_path):
    path = tmp_path / "log" / "shared.txt"
    path.parent.mkdir()
    path.write_text("old line\n")
    code = WRITER.format(repo=REPO)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), name], stdout=subprocess.DEVNULL)
        for name in ("A", "B")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert lines[0] == "old line" and len(lines) == 31  # appended, never truncated
    first = lines[1].split()[0]
    second = "B" if first == "A" else "A"
    assert lines[1:] == [f"{first} line {i}" for i in range(15)] + [f"{second} line {i}" for i in range(15)]


def test_lines_are_on_disk_as_soon_as_written(tmp_path):
    sys.path.insert(0, REPO)
    from common import RunLog

    path = tmp_path / "run.txt"
    with RunLog(str(path)) as log:
        log.write("first")
        assert path.read_text() == "first\n"  # flushed: `tail -f` sees progress
        log.write("second")
    assert path.read_text() == "first\nsecond\n"
