"""StopBudget: a batch inside a stop ends before a step could overrun the deadline."""

from __future__ import annotations

from djprobe.batches import MARGIN, StopBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_steps_end_before_the_deadline_with_the_longest_step_as_margin():
    clock = FakeClock()
    budget = StopBudget(clock.now + 0.010, clock)
    done = 0
    while True:
        clock.now += 0.001  # a 1 ms step
        done += 1
        if not budget.room_for_another():
            break
    assert clock.now + 0.001 <= budget.deadline  # the next step would have fit, but not with the margin
    assert clock.now + MARGIN * 0.001 >= budget.deadline
    assert done == budget.steps == 8


def test_one_slow_step_ends_the_batch():
    clock = FakeClock()
    budget = StopBudget(clock.now + 0.010, clock)
    clock.now += 0.0001
    assert budget.room_for_another()
    clock.now += 0.004  # a slow step (a busy machine): two more would overrun
    assert not budget.room_for_another()
    assert abs(budget.longest - 0.004) < 1e-9


def test_past_the_deadline_no_more_steps():
    clock = FakeClock()
    budget = StopBudget(clock.now - 0.001, clock)
    clock.now += 0.00001
    assert not budget.room_for_another()
