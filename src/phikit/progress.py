"""Progress for long work: tqdm's bar on a terminal; in a log (output not a terminal), a plain line at the start,
every PLAIN_INTERVAL seconds and at the end, never a `\\r` update that a log file would keep as one huge line."""
from __future__ import annotations

import sys

from tqdm import tqdm as _tqdm

PLAIN_INTERVAL = 10.0  # seconds between plain lines


class _Nowhere:
    """Takes tqdm's own terminal writes (carriage returns, clearing) when plain lines are written instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class tqdm(_tqdm):
    """Drop-in for tqdm.tqdm (same arguments, `write`, `set_postfix` ...) that is plain when not on a terminal."""

    def __init__(self, *args, **kwargs) -> None:
        out = kwargs.get("file") or sys.stderr
        isatty = getattr(out, "isatty", None)
        self._plain_out = None if isatty and isatty() else out
        if self._plain_out is not None:
            kwargs["file"] = _Nowhere()
            kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), PLAIN_INTERVAL)
            kwargs["maxinterval"] = max(kwargs.get("maxinterval", 10.0), PLAIN_INTERVAL)
            kwargs["dynamic_ncols"] = False
            kwargs["ncols"] = 0  # no bar: the counts, rate and time only
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._plain_out is None:
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return True
        line = (msg or self.__str__()).strip()
        if line and line != getattr(self, "_last_line", None):
            self._last_line = line
            self._plain_out.write(line + "\n")
            self._plain_out.flush()
        return True
