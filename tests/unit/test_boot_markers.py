"""Boot markers: parsed as hostile input, and (Firecracker only) taken out of the console
however its bytes are split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mvm.runtime.boot_markers import MAX_SERVICES, BootLog, ConsoleFilter, parse_marker

STREAM = (b"[    0.27] kernel noise\r\nmvm-boot: init 1.30\r\nmvm-boot: entrypoint 1.36\r\n"
          b"hello\r\nprompt$ mvm-boot: not at line start\r\nmvm-boot: exit 7 1.42\r\nreboot: Power down\r\n")


@given(st.lists(st.integers(1, len(STREAM)), max_size=12))
def test_console_markers_and_output_regardless_of_chunking(cuts: list[int]) -> None:
    out = bytearray()
    boot = BootLog()
    console = ConsoleFilter(sink=out.extend, boot_log=boot)
    points = sorted(set([0, *cuts, len(STREAM)]))
    for a, b in zip(points, points[1:]):
        console.feed(STREAM[a:b])
    console.flush()
    assert bytes(out) == (b"[    0.27] kernel noise\nhello\nprompt$ mvm-boot: not at line start\n"
                          b"reboot: Power down\n")
    assert [m.phase for m in boot.markers] == ["init", "entrypoint", "exit"]
    assert boot.exit_status() == 7
    assert boot.markers[0].guest_uptime == 1.30


@given(st.lists(st.integers(1, len(STREAM)), max_size=12))
def test_a_console_without_a_boot_log_is_data_only(cuts: list[int]) -> None:
    """QEMU and Docker: markers travel elsewhere, so a workload printing one is just output."""
    out = bytearray()
    console = ConsoleFilter(sink=out.extend)
    points = sorted(set([0, *cuts, len(STREAM)]))
    for a, b in zip(points, points[1:]):
        console.feed(STREAM[a:b])
    console.flush()
    assert bytes(out) == STREAM.replace(b"\r\n", b"\n")


def test_prompt_without_newline_passes_through_at_once() -> None:
    out = bytearray()
    console = ConsoleFilter(sink=out.extend, boot_log=BootLog())
    console.feed(b"/ # ")
    assert bytes(out) == b"/ # "


def test_only_well_formed_markers_of_known_phases_are_kept() -> None:
    good = [b"mvm-boot: init 1.30", b"mvm-boot: exit 3 2.5", b"mvm-boot: service-exit web 2 4.0",
            b"mvm-boot: service-start web-1 1", b"mvm-boot: shutdown 9.9", b"mvm-boot: fatal no root disk /dev/vda"]
    bad = [b"mvm-boot: exit", b"mvm-boot: exit oops 1.0", b"mvm-boot: exit 256 1.0", b"mvm-boot: exit -1 1.0",
           b"mvm-boot: service-exit web oops 2", b"mvm-boot: service-exit web", b"mvm-boot: service-start a/b 1",
           b"mvm-boot: init extra 1.0", b"mvm-boot: reboot 1.0", b"mvm-boot: \xff\xfe", b"mvm-boot: ",
           b"mvm-boot: exit \xd9\xa3 1.0", b"mvm-boot: init " + b"9" * 600]
    assert all(parse_marker(line) is not None for line in good)
    assert [line for line in bad if parse_marker(line) is not None] == []


def test_a_flood_of_markers_keeps_the_log_bounded() -> None:
    boot = BootLog()
    for i in range(10_000):
        boot.feed(f"mvm-boot: service-start s{i} 1.0\nmvm-boot: init 1.0\nmvm-boot: exit {i % 256} 1.0\n".encode())
    boot.feed(b"x" * 100_000)  # a line without an end
    assert len(boot.services) == MAX_SERVICES and len(boot.markers) == 2
    assert boot.exit_status() == 9_999 % 256 and boot.rejected > 0
    assert len(boot._partial) == 0


@given(st.binary(max_size=2000))
def test_any_bytes_never_raise_and_stay_bounded(data: bytes) -> None:
    boot = BootLog()
    boot.feed(data)
    boot.feed(b"\n")
    assert len(boot.markers) <= 9 and len(boot._partial) <= 1
    status = boot.exit_status()
    assert status is None or 0 <= status <= 255


def test_the_kernels_power_down_line_is_held_then_dropped_only_after_the_end() -> None:
    import re

    line = re.compile(rb"\[ *\d+\.\d+\] reboot: Power down\r?\n").fullmatch
    for ended, more, expected in ((True, b"", b"bye\n"), (False, b"", b"bye\n[    3.16] reboot: Power down\n"),
                                  (True, b"later\n", b"bye\n[    3.16] reboot: Power down\nlater\n")):
        out = bytearray()
        console = ConsoleFilter(sink=out.extend, hold_line=line, drop_held=lambda ended=ended: ended)
        console.feed(b"bye\r\n[    3.16] reboot: Power down\r\n")
        console.feed(more)
        console.flush()
        assert bytes(out) == expected


def test_the_power_down_line_is_held_wherever_the_console_reads_split_it() -> None:
    """QEMU's UART writes byte by byte: under load a read can end anywhere in the line."""
    from mvm.runtime.supervisor.console import POWER_DOWN, power_down_start

    stream = b"3\r\n[    2.839469] reboot: Power down\r\n"
    for cut in range(1, len(stream)):
        for ended in (True, False):
            out = bytearray()
            console = ConsoleFilter(sink=out.extend, hold_line=POWER_DOWN.fullmatch, hold_start=power_down_start,
                                    drop_held=lambda ended=ended: ended)
            console.feed(stream[:cut])
            console.feed(stream[cut:])
            assert console.holding
            console.flush()
            assert bytes(out) == (b"3\n" if ended else b"3\n[    2.839469] reboot: Power down\n"), cut


def test_a_prompt_that_only_looks_like_the_start_of_the_power_down_line_passes_at_once() -> None:
    from mvm.runtime.supervisor.console import POWER_DOWN, power_down_start

    for prompt in (b"[root@vm /]# ", b"[ 1.5] rebooting? ", b"[x", b"[ 12.5] reboot: Power off"):
        out = bytearray()
        ConsoleFilter(sink=out.extend, hold_line=POWER_DOWN.fullmatch, hold_start=power_down_start,
                      drop_held=lambda: True).feed(prompt)
        assert bytes(out) == prompt
    for start in (b"[", b"[   ", b"[ 2", b"[ 2.", b"[ 2.8] ", b"[ 2.8] reboot: Pow"):
        assert power_down_start(start), start
