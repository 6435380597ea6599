"""The boot gate's arithmetic and its budgets (the boots themselves: tests/integration/test_boot.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mvm.core.bootimage import BOOT_BUDGET_MS, EXPECTED_BOOT_MS, BootImage, _budget
from mvm.runtime.perf import BootGate, percentile


@given(st.lists(st.integers(0, 100_000), min_size=1, max_size=50))
def test_p50_is_the_median_and_percentiles_stay_within_the_values(values: list[int]) -> None:
    values.sort()
    assert percentile(values, 50) == statistics.median(values)
    p90, p99 = percentile(values, 90), percentile(values, 99)
    assert values[0] <= percentile(values, 50) <= p90 <= p99 <= values[-1]  # type: ignore[operator]


def gate(ready: list[int | None], budget: int) -> BootGate:
    return BootGate("hello", "qemu", "tcg", budget, "--p50-ms",
                    [{"agent-ready": r, "init": 5} for r in ready])


def test_the_gate_passes_at_or_under_the_budget_and_fails_over_it() -> None:
    assert gate([100, 300, 200], 200).passed  # p50 200
    assert not gate([100, 300, 201], 200).passed
    assert "over the budget of 200 ms" in gate([100, 300, 201], 200).verdict()
    assert gate([100, 300], 200).p50_ms == 200  # (the mean of the middle two)


def test_a_boot_that_never_reached_agent_ready_fails_the_gate() -> None:
    failed = gate([100, None, 100], 10_000)
    assert not failed.passed and "1 of 3 boots never reached agent-ready" in failed.verdict()
    assert failed.stats()["agent-ready"]["n"] == 2 and failed.stats()["kernel"]["p50"] is None


def test_the_budgets_differ_by_accelerator_and_the_image_carries_them(tmp_path: Path) -> None:
    assert BOOT_BUDGET_MS["kvm"] < BOOT_BUDGET_MS["tcg"]
    assert EXPECTED_BOOT_MS == max(BOOT_BUDGET_MS.values())
    image = BootImage(path=tmp_path, key="k" * 64, name="w", vcpus=1, memory_mib=128, data_disk_bytes=None,
                      expected_boot_ms=2000, kernel_release="6.1", accessible=False, sealed=True,
                      entrypoint_kind="command", agent_uid=990, entrypoint_uid=1000, hypervisor="auto", forwards=(),
                      boot_budget=_budget({"tcg": 1234, "kvm": True, "bad": "x"}))
    assert image.boot_budget_ms("tcg") == 1234
    assert image.boot_budget_ms("kvm") == BOOT_BUDGET_MS["kvm"]  # (true is not a number of ms)
    assert image.boot_budget_ms("other") == 2000  # an accelerator nobody budgeted: expectedBootMs
    assert _budget(json.loads('["not", "a", "dict"]')) == ()
