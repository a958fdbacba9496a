"""The tracer's scheduling while the target is stopped: not preempted by other programs.

A batch of insertions inside one stop is cut so that the stop keeps its 10 ms budget
(:mod:`djprobe.batches`), but a tracer preempted in the middle of a step (on a busy machine,
a time slice of another program: 3 to 5 ms, measured) holds the target that much longer: on a
machine with a load of 9 on two CPUs, a third of the insertion stops of 20,000 probes ran over
10 ms, by up to 3.5 ms, every one of them because of one such step; at load 21, stopping the
threads itself took up to 26 ms (the tracer preempted between two threads). From the request to
stop to the end of the resume, :class:`StopPriority` runs the tracer's thread under
``SCHED_FIFO`` at the lowest real-time priority, so that no ordinary task takes its CPU; it goes
back to its own policy as soon as the target runs again. (Its waits for the target's threads
sleep after a few yields, so they do not keep the CPU from them.) Only with the right to (root or ``CAP_SYS_NICE``); otherwise nothing changes.
The kernel's real-time throttling (95% of each second by default) still bounds what a
real-time thread can take, and the stops themselves are bounded.
"""

from __future__ import annotations

import os

__all__ = ["StopPriority"]

#: ``DJPROBE_RT_STOPS=0`` leaves the tracer's scheduling alone.
ENV = "DJPROBE_RT_STOPS"


class StopPriority:
    """``raise_()`` before stopping the world, ``restore()`` once it runs again (the calling
    thread: the one that traces). ``enabled`` False, or a failed first attempt (no right to),
    makes both do nothing."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = os.environ.get(ENV, "1") != "0" if enabled is None else enabled
        self._saved: tuple[int, os.sched_param] | None = None
        self._denied = False

    @property
    def raised(self) -> bool:
        return self._saved is not None

    def raise_(self) -> bool:
        """Run the calling thread under SCHED_FIFO (priority 1); False if not done."""
        if not self.enabled or self._denied or self._saved is not None:
            return False
        try:
            saved = (os.sched_getscheduler(0), os.sched_getparam(0))
            if saved[0] in (os.SCHED_FIFO, os.SCHED_RR):
                return False  # real-time already: the caller chose its own
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except (OSError, AttributeError):
            self._denied = True  # no right to (or no such call): not tried again
            return False
        self._saved = saved
        return True

    def restore(self) -> None:
        """Back to the policy the thread had before ``raise_()``."""
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                os.sched_setscheduler(0, saved[0], saved[1])
            except OSError:
                pass  # the thread keeps SCHED_FIFO 1: harmless for the target, logged by nobody
