"""Batches of work inside one stop of the world, cut so that the stop keeps its budget.

Inserting or removing thousands of probes stops the target many times, each stop doing as many
steps as fit in ``ProbedProcess.max_stop_seconds``. Checking the clock only after a step lets the
last step overshoot the deadline by its own length (and a step slowed down by a busy machine by
more); a :class:`StopBudget` begins a step only if the longest step of this stop so far, with a
margin, still ends before the deadline.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["StopBudget"]

#: A step is begun only if this many times the longest step seen in the stop still fits.
MARGIN = 2.0


class StopBudget:
    """Says, after each step of a batch, whether another one fits before ``deadline``
    (``time.monotonic`` seconds). The first step of a stop is always done (a stop that does
    nothing would only cost the target)."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        self._clock = clock
        self._last = clock()
        self.longest = 0.0
        self.steps = 0

    def room_for_another(self) -> bool:
        """Call after each step: True if one more step (as long as the longest so far, times
        :data:`MARGIN`) ends before the deadline."""
        now = self._clock()
        step = now - self._last
        self._last = now
        self.steps += 1
        if step > self.longest:
            self.longest = step
        return now + MARGIN * self.longest < self.deadline
