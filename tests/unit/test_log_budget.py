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



def test_the_sum_is_written_when_the_window_ends_without_another_event(capsys: pytest.CaptureFixture[str]) -> None:
    """A guest that hammers and then goes quiet: the supervisor's loop writes the sum itself."""
    import asyncio

    async def hammer_then_wait() -> None:
        budget = LogBudget("knocks", burst=2, window_s=0.05)
        assert [budget.allow() for _ in range(5)] == [True, True, False, False, False]
        for _ in range(500):
            if "3 more knocks" in capsys.readouterr().err:
                return
            await asyncio.sleep(0.01)
        pytest.fail("the held-back count was never written")

    asyncio.run(hammer_then_wait())


def test_flush_all_writes_what_an_open_window_held_back(capsys: pytest.CaptureFixture[str]) -> None:
    from mvm.runtime.log_budget import flush_all

    budget = LogBudget("knocks", burst=1, window_s=3600)
    assert [budget.allow() for _ in range(4)] == [True, False, False, False]
    flush_all()
    assert capsys.readouterr().err == "mvm-supervisor: 3 more knocks (not logged one by one)\n"
    flush_all()  # (written once)
    assert capsys.readouterr().err == ""
