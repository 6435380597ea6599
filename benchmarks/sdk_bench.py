"""SDK and MCP benchmarks: `Sandbox.create` to its first command's result, booted cold and
cloned from the built-in's template; `commands.run("true")` in-process; the MCP `run` tool's
round trip on a warm session, through a real `mvmctl mcp` over stdio."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from common import MVMCTL, Bench, banner, fmt_ms, fmt_s, median, row, samples

RUNS = 50


def bench_sdk(bench: Bench) -> None:
    os.environ["MVM_HOME"] = bench.env["MVM_HOME"]
    os.environ["MVM_ACCEL"] = bench.env["MVM_ACCEL"]
    import mvm

    mvm.Sandbox.create("base", timeout=600).kill()  # built, and its template saved, before timing
    n = bench.rounds
    banner(f"Sandbox.create('base') to its first command's result: cold boot vs template clone ({n} each)")
    cold, warm = [], []
    for _ in range(n):
        for cold_boot, into in ((True, cold), (False, warm)):
            started = time.perf_counter()
            with mvm.Sandbox.create("base", timeout=600, cold=cold_boot) as sbx:
                sbx.commands.run("true")
                into.append(time.perf_counter() - started)
    samples("cold", cold)
    samples("template", warm)
    row("Sandbox.create, cold boot", fmt_s(cold))
    row("Sandbox.create, from the template", fmt_s(warm))
    ratio = median(cold) / median(warm)
    row("ratio cold / template", f"{ratio:7.1f} x")
    bench.target("sdk: Sandbox.create cold / template", f"{ratio:.1f}x ({median(cold):.2f} s vs {median(warm):.2f} s)",
                 None, "measured")

    banner(f"commands.run('true') in-process ({RUNS} calls, one sandbox)")
    with mvm.Sandbox.create("base", timeout=600) as sbx:
        sbx.commands.run("true")
        runs = []
        for _ in range(RUNS):
            started = time.perf_counter()
            sbx.commands.run(["true"])
            runs.append(time.perf_counter() - started)
        guest = []
        for _ in range(RUNS // 5):  # the guest's own fork+exec of `true`, timed inside the guest
            out = sbx.commands.run("a=$(cut -d' ' -f1 /proc/uptime); true; b=$(cut -d' ' -f1 /proc/uptime); "
                                   "echo $a $b").stdout.split()
            guest.append(float(out[1]) - float(out[0]))
    row("commands.run(['true'])", fmt_ms(runs))
    row("  the guest's own fork+exec of true (uptime, 10 ms ticks)", fmt_ms(guest))
    bench.target("sdk: commands.run('true') median (qemu, TCG)", f"{median(runs) * 1000:.1f} ms", median(runs) <= 0.002,
                 "<= 2 ms excluding the guest's fork (goal)")
    asyncio.run(_bench_mcp(bench))


async def _bench_mcp(bench: Bench) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    banner(f"MCP `run` tool on a warm session ({RUNS // 2} calls, a real `mvmctl mcp` over stdio)")
    params = StdioServerParameters(command=sys.executable, args=[*MVMCTL[1:], "mcp"], env=dict(bench.env))
    with open(os.devnull, "w") as quiet:  # (the server logs every request on stderr)
        async with stdio_client(params, errlog=quiet) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            first = await client.call_tool("run", {"code": "true"})
            assert not first.isError and first.structuredContent, first
            session = first.structuredContent["session"]
            calls = []
            for _ in range(RUNS // 2):
                started = time.perf_counter()
                result = await client.call_tool("run", {"code": "true", "session": session})
                calls.append(time.perf_counter() - started)
                assert not result.isError, result
            await client.call_tool("run", {"code": "true", "session": session, "close": True})
    row("MCP run('true') round trip, warm session", fmt_ms(calls))
    bench.target("mcp: run tool round trip, warm session", f"{median(calls) * 1000:.1f} ms", None, "measured")
