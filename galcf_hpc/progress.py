"""Progress for long work: a bar on a terminal, periodic plain log lines in batch logs."""

import logging
import sys
import time

log = logging.getLogger("galcf_hpc")


class Progress:
    def __init__(self, total, label, every_s=30.0, stream=None):
        self.total, self.label, self.every_s = max(int(total), 1), label, every_s
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.done = 0

    def __call__(self, done, total=None, info=""):
        if total:
            self.total = max(int(total), 1)
        self.done = done
        now = time.monotonic()
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        if self.tty:
            width = 28
            filled = int(width * min(done, self.total) / self.total)
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"{rate:.1f}/s eta {eta:.0f}s {info}   "
            )
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self.last >= self.every_s or done >= self.total:
            self.last = now
            log.info("%s %d/%d (%.1f/s, eta %.0fs) %s", self.label, done, self.total, rate, eta, info)


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
