"""Boot markers are taken out of the console stream however the bytes are split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mvm.runtime.console import ConsoleFilter

STREAM = (b"[    0.27] kernel noise\r\nmvm-boot: init 1.30\r\nmvm-boot: entrypoint 1.36\r\n"
          b"hello\r\nprompt$ mvm-boot: not at line start\r\nmvm-boot: exit 7 1.42\r\nreboot: Power down\r\n")


@given(st.lists(st.integers(1, len(STREAM)), max_size=12))
def test_markers_and_output_regardless_of_chunking(cuts: list[int]) -> None:
    out = bytearray()
    console = ConsoleFilter(sink=out.extend)
    points = sorted(set([0, *cuts, len(STREAM)]))
    for a, b in zip(points, points[1:]):
        console.feed(STREAM[a:b])
    console.flush()
    assert bytes(out) == b"[    0.27] kernel noise\nhello\nprompt$ mvm-boot: not at line start\n"
    assert [m.phase for m in console.markers] == ["init", "entrypoint", "exit"]
    assert console.exit_status() == 7
    assert console.markers[0].guest_uptime == 1.30
    assert bytes(console.after_exit) == b"reboot: Power down\r\n"


def test_prompt_without_newline_passes_through_at_once() -> None:
    out = bytearray()
    console = ConsoleFilter(sink=out.extend)
    console.feed(b"/ # ")
    assert bytes(out) == b"/ # "
