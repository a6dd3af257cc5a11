"""What a person sees while a job runs: one live line per plate, a summary line as each plate ends,
and Ray's own chatter in the log file instead of the terminal."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, TextIO

from ..io.sources import SiteKey


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlateProgress:
    """Counts finished sites per plate and reports them.

    On a terminal the current plate's line is rewritten in place (sites done/total, cells/s,
    elapsed, ETA); elsewhere (a log, ``make demo`` under CI) a line is printed at most every
    ``every`` seconds. When a plate's last site is done, its summary line is printed.

    Parameters
    ----------
    todo : mapping plate -> number of sites to do in this run
    stream : text stream (default stderr)
    live : bool, optional
        Rewrite the line in place (default: when ``stream`` is a terminal).
    """

    def __init__(self, todo: Mapping[str, int], stream: TextIO | None = None, live: bool | None = None,
                 every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.todo = {p: int(n) for p, n in todo.items() if n}
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every, self.clock = every, clock
        self.t0 = clock()
        self.started: dict[str, float] = {}
        self.sites: dict[str, int] = dict.fromkeys(self.todo, 0)
        self.skipped: dict[str, int] = dict.fromkeys(self.todo, 0)
        self.cells: dict[str, int] = dict.fromkeys(self.todo, 0)
        self._last_print = -1e9
        self._last_event = self.t0
        self._open_line = False

    def line(self, plate: str) -> str:
        now = self.clock()
        elapsed = now - self.started.get(plate, self.t0)
        done, total = self.sites[plate], self.todo[plate]
        rate = self.cells[plate] / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (total - done) if done else float("nan")
        return (f"  {plate}: {done}/{total} sites, {self.cells[plate]} cells, {rate:.1f} cells/s, "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta) if eta == eta else '?'}")

    def site_done(self, key: SiteKey, n_cells: int | None) -> None:
        """Record one finished site (``n_cells`` None: skipped)."""
        plate = key.plate
        if plate not in self.todo:
            return
        # a plate's clock starts when the site before its first one finished (the job's start for the first)
        self.started.setdefault(plate, self._last_event)
        self.sites[plate] += 1
        self.cells[plate] += int(n_cells or 0)
        self.skipped[plate] += n_cells is None
        finished = self.sites[plate] >= self.todo[plate]
        now = self._last_event = self.clock()
        if finished:
            elapsed = now - self.started[plate]
            self._write(f"  {plate} done: {self.sites[plate]} sites ({self.skipped[plate]} skipped), "
                        f"{self.cells[plate]} cells in {elapsed:.1f} s "
                        f"({self.cells[plate] / max(elapsed, 1e-9):.1f} cells/s)", final=True)
        elif self.live or now - self._last_print >= self.every:
            self._write(self.line(plate), final=False)
            self._last_print = now

    def _write(self, text: str, final: bool) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings")


@contextlib.contextmanager
def ray_output_to(log_file: str | Path | None) -> Iterator[TextIO]:
    """While the block runs, Ray's output goes to ``log_file`` (appended) instead of the terminal:
    its Python log records, Python warnings, and what its C++ core worker writes to file descriptor 2
    (e.g. the "constructor arguments in the object store" line, Ray issue 57733). Yields the terminal
    (the original stderr) for the job's own progress lines. ``None`` changes nothing (``--verbose``)
    and yields ``sys.stderr``. The package's own records go to the log and, after the block, its
    errors propagate to the terminal as usual."""
    if log_file is None:
        yield sys.stderr
        return
    try:  # Ray Data sets up its console handler when it is first imported: do that first, then mute it
        import ray.data  # noqa: F401
    except ImportError:
        pass
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    changed: list[tuple[logging.Logger, bool]] = []
    ours = logging.getLogger("microsnoop_ray")
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log_fd, 2)
    logging.captureWarnings(True)
    try:
        for name in _RAY_LOGGERS:
            lg = logging.getLogger(name)
            changed.append((lg, lg.propagate))
            lg.addHandler(handler)
            lg.propagate = False  # not to the terminal handlers above
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.addFilter(_mute)
        ours.addHandler(handler)  # the package's own records: in the log too
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        for fd in (saved, log_fd):
            os.close(fd)
        terminal.close()
        ours.removeHandler(handler)
        for lg, propagate in changed:
            lg.removeHandler(handler)
            lg.propagate = propagate
            for h in lg.handlers:
                h.removeFilter(_mute)
        logging.captureWarnings(False)
        handler.close()


def _mute(record: logging.LogRecord) -> bool:
    return False
