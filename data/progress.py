"""Progress of long work (convert, inspect, train, encode), readable where it lands; shared by every command.

On a terminal: a tqdm bar. Elsewhere (an sbatch job's log file): the same tqdm, but each refresh is one
plain, time-stamped line, at most every ``every_s`` seconds, plus the last. A bar written to a file
becomes one ever-growing line of carriage returns that neither ``tail -f`` nor ``grep`` reads, and
tqdm's own choice off a terminal (``disable=None``) shows nothing at all.
"""
from __future__ import annotations

import io
import sys
import time

from tqdm import tqdm

LINE = "{desc} {n_fmt}/{total_fmt} ({percentage:.1f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_NO_TOTAL = "{desc} {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _Lines(io.TextIOBase):
    """tqdm's output file off a terminal: each refresh ('\\r' + status) becomes one line. A refresh at the same
    count as the last line is dropped (tqdm refreshes once more when it closes; only its rate differs)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        count = text.rsplit(" [", 1)[0]  # "desc n/total (p%)": the rest is timing
        if text and count != self.last:
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.stream.flush()
            self.last = count
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, total: int | None = None, desc: str, disable: bool = False,
                 every_s: float = 30.0, stream=None, **kwargs) -> tqdm:
    """A tqdm for ``iterable`` / ``total``: a bar on a terminal, a line every ``every_s`` seconds elsewhere."""
    stream = sys.stderr if stream is None else stream
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=2.0, file=stream, **kwargs)
    known = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    # maxinterval too: tqdm's monitor thread would otherwise force a refresh every 10 s
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=_Lines(stream), mininterval=every_s,
                maxinterval=max(every_s, 1.0), bar_format=LINE if known is not None else LINE_NO_TOTAL, **kwargs)
