"""Progress of long commands: a bar with rate and ETA on a terminal, plain log lines with
ETA in batch logs (tested through a real pseudo-terminal and a pipe)."""

import io
import logging
import os
import pty
import select
import subprocess
import sys

from galcf_hpc.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal_counts_and_ends_with_a_newline():
    out = _Terminal()
    p = Progress(4, "verify", stream=out)
    for done in range(1, 5):
        p(done)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "verify [#######.....................] 1/4" in text and "verify [############################] 4/4" in text
    assert "eta" in text and "/s" in text


def test_log_lines_without_a_terminal(caplog):
    out = io.StringIO()  # a batch log: no bar, no carriage returns
    p = Progress(3, "catalog", every_s=0.0, stream=out)
    with caplog.at_level(logging.INFO, logger="galcf_hpc"):
        for done in range(1, 4):
            p(done, info="unit 2")
    assert out.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("catalog 3/3 (") and "eta" in lines[-1]
    assert lines[0].endswith("unit 2")


def _verify(shards, stderr):
    return subprocess.Popen(
        [sys.executable, "-m", "galcf_hpc.cli", "data", "verify", str(shards)],
        stdout=subprocess.PIPE,
        stderr=stderr,
    )


def test_data_verify_draws_a_bar_on_a_terminal_and_logs_in_a_pipe(sharded):
    master, slave = pty.openpty()
    proc = _verify(sharded.out, slave)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = seen.decode()
    assert "\rverify [" in text and "240/240" in text and "eta" in text

    piped = _verify(sharded.out, subprocess.PIPE)
    out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0 and b"OK:" in out
    assert b"\r" not in err and b"INFO verify 240/240" in err and b"eta" in err
