"""The supervisor's bound on lines the guest can provoke at will."""

from __future__ import annotations

import time

import pytest

from mvm.runtime.log_budget import LogBudget


def test_a_burst_is_logged_the_rest_counted_and_summed_up_later(capsys: pytest.CaptureFixture[str]) -> None:
    budget = LogBudget("knocks", burst=3, window_s=0.05)
    assert [budget.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert capsys.readouterr().err == ""
    deadline = time.monotonic() + 5
    while time.monotonic() - budget.window_start <= budget.window_s and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.allow()  # a new window: one line again, after the sum of the last one's rest
    assert capsys.readouterr().err == "mvm-supervisor: 7 more knocks (not logged one by one)\n"
    assert [budget.allow() for _ in range(3)] == [True, True, False]

