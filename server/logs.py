"""Log lines for operators: repeated warnings are rate-limited, so a persistent fault (a full disk,
a client that stops reading, a store that cannot be checkpointed) says so once a minute, not
thousands of times, and says how many it held back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REPEAT_INTERVAL_S = 60.0


class RepeatFilter(logging.Filter):
    """Passes the first warning (or error) of each kind — same logger, level and message template —
    then at most one per `interval_s`, counting the rest into the next one that passes."""

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        held = 0 if last is None else last[1]
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self._interval_s:g} s were not logged)"
        return True
