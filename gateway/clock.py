"""The wall clock, checked against the monotonic one before it decides what is old.

Retention (the audit trail's, conversations') and the quota tables' pruning delete by wall-clock
time. A clock stepped far ahead while the process runs (a mistyped ``date -s``, a bad hardware
clock, a VM resumed before NTP corrects it) would make them delete what is not old: 400 days ahead
for a few seconds emptied the audit trail and every conversation. The background runs ask
:func:`deletions_allowed` first: a wall clock that has moved ahead of where the monotonic clock puts
it (by more than ``MAX_STEP``) holds them back until it comes back, or until the new time has held
for ``SETTLE`` (an operator's deliberate correction). A clock that moved back deletes less than
intended, never more: it does not hold them back.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("gateway.clock")

#: Seconds the wall clock may move ahead against the monotonic one (NTP slews small drifts and
#: steps rarely by more than a few seconds) before deletions by age wait.
MAX_STEP = 300.0
#: Seconds a new time must hold before it is taken as the right one.
SETTLE = 6 * 3600.0


class WallClock:
    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()  # wall clock minus monotonic, as trusted
        self._pending: float | None = None  # a newer offset, ahead of the trusted one
        self._pending_since = 0.0

    def deletions_allowed(self, what: str) -> bool:
        mono = time.monotonic()
        offset = time.time() - mono
        ahead = offset - self.offset
        if ahead <= MAX_STEP:
            self._pending = None
            return True
        if self._pending is None or abs(offset - self._pending) > MAX_STEP:
            self._pending, self._pending_since = offset, mono
        held = mono - self._pending_since
        if held >= SETTLE:
            log.warning("the wall clock has been %.0f s ahead of where it was for %.0f h: taken as the right time, "
                        "%s runs again", ahead, held / 3600, what)
            self.offset, self._pending = offset, None
            return True
        log.warning("%s skipped: the wall clock moved %.0f s ahead since the gateway started (measured against its "
                    "own monotonic clock), and by a clock stepped ahead it would delete what is not old; it runs once "
                    "the clock is back, or once the new time has held for %.0f h (a restart takes it at once)",
                    what, ahead, SETTLE / 3600)
        return False


#: The process's wall clock (its offset taken when the gateway is imported, at start).
CLOCK = WallClock()


def deletions_allowed(what: str) -> bool:
    """May a background run delete by wall-clock age now? (Logs why not.)"""
    return CLOCK.deletions_allowed(what)
