"""The application side of the ``latency`` and ``asyncio`` scenarios, one
handler per process: ``python -m benchmarks.caller SPEC_JSON``.

Modes (``spec["mode"]``):

- ``sync``: ``logger.info(MESSAGE, name, n)`` in a plain loop, each call
  timed with ``perf_counter_ns``.
- ``pace``: the same calls at a service's pace: a 0.2 ms pause (not timed)
  every 50 calls.
- ``coroutine``: the same calls from a coroutine under ``asyncio.run``,
  yielding to the loop (``await asyncio.sleep(0)``) every ``yield_every``
  calls, as request handlers do; every row yields the same way.
- ``cpu``: ``calls`` untimed ``logger.info`` calls; the app process's CPU
  (user + system, all its threads: ``getrusage(RUSAGE_SELF)``) from the
  first call until the handler has written everything (closed: drained),
  per record, in µs (metric ``cpu``).
- ``error``: ``logger.error(MESSAGE, name, n)`` timed per call, a 1 ms
  pause every 10 calls (a sync record with the default ``sync_level``).
- ``lag``: a ticker coroutine measures how late ``asyncio.sleep(0.001)``
  wakes while a producer coroutine logs ``rate`` records/s for ``seconds``
  (``idle``: the ticker alone).

Every mode warms up first (same calls, not measured), closes the handler
(which drains it) and counts the lines in the files: the worker fails if a
record is missing that the handler did not report as dropped. It prints one
JSON line: percentiles in µs, calls, lines, records dropped (by the
handler's documented policy, and counted by it), the handler's stats.
"""

import asyncio
import json
import resource
import sys
import time
from typing import Any, Dict, List

from clh_writerd.client._notices import DROP_WARNING_EVERY

from .handlers import MESSAGE, NAMES, Built, build, log_files, new_logger, percentiles
from .workload import count_lines

PACE_EVERY = 50
PACE_PAUSE = 0.0002


def timed_calls(info: Any, calls: int, first: int = 0) -> List[int]:
    ns = time.perf_counter_ns
    names = NAMES
    samples = [0] * calls
    for i in range(calls):
        started = ns()
        info(MESSAGE, names[i & 63], first + i)
        samples[i] = ns() - started
    return samples


def run_sync(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    info = new_logger("bench.latency", built.handler).info
    timed_calls(info, spec["warmup"])
    if built.path is not None and hasattr(built.handler, "flush"):
        built.handler.flush()  # the warm-up's backlog must not land on the measured calls
    samples = timed_calls(info, spec["calls"], spec["warmup"])
    return {"samples": samples, "logged": spec["warmup"] + spec["calls"]}


def run_pace(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    """``sync``'s calls at a service's pace: a PACE_PAUSE pause every PACE_EVERY calls (not timed)."""
    info = new_logger("bench.pace", built.handler).info
    timed_calls(info, spec["warmup"])
    if built.path is not None and hasattr(built.handler, "flush"):
        built.handler.flush()
    samples: List[int] = []
    first = spec["warmup"]
    for start in range(0, spec["calls"], PACE_EVERY):
        samples += timed_calls(info, min(PACE_EVERY, spec["calls"] - start), first + start)
        time.sleep(PACE_PAUSE)
    return {"samples": samples, "logged": spec["warmup"] + spec["calls"]}


def run_cpu(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    info = new_logger("bench.cpu", built.handler).info
    timed_calls(info, spec["warmup"])
    if built.path is not None and hasattr(built.handler, "flush"):
        built.handler.flush()
    names = NAMES
    first, calls = spec["warmup"], spec["calls"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(calls):
        info(MESSAGE, names[i & 63], first + i)
    built.close()  # drains: the CPU spent writing every record is counted
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"samples": [], "metrics": {"cpu": cpu * 1e6 / calls}, "logged": first + calls, "closed": True}


def run_error(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    logger = new_logger("bench.error", built.handler)
    ns = time.perf_counter_ns
    names = NAMES
    error = logger.error
    total = spec["warmup"] + spec["calls"]
    samples = []
    for i in range(total):
        started = ns()
        error(MESSAGE, names[i & 63], i)
        if i >= spec["warmup"]:
            samples.append(ns() - started)
        if i % 10 == 9:
            time.sleep(0.001)
    return {"samples": samples, "logged": total}


async def _coroutine_calls(info: Any, calls: int, first: int, yield_every: int) -> List[int]:
    ns = time.perf_counter_ns
    names = NAMES
    samples = [0] * calls
    for i in range(calls):
        started = ns()
        info(MESSAGE, names[i & 63], first + i)
        samples[i] = ns() - started
        if i % yield_every == yield_every - 1:
            await asyncio.sleep(0)
    return samples


async def run_coroutine(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    info = new_logger("bench.asyncio", built.handler).info
    await _coroutine_calls(info, spec["warmup"], 0, spec["yield_every"])
    await _settle(built)
    samples = await _coroutine_calls(info, spec["calls"], spec["warmup"], spec["yield_every"])
    await _aclose(built)
    return {"samples": samples, "logged": spec["warmup"] + spec["calls"]}


async def run_lag(spec: Dict[str, Any], built: Built) -> Dict[str, Any]:
    info = new_logger("bench.lag", built.handler).info
    if not spec.get("idle"):
        await _coroutine_calls(info, spec["warmup"], 0, spec["yield_every"])
        await _settle(built)
    lags: List[int] = []
    done = asyncio.Event()

    async def ticker() -> None:
        ns = time.perf_counter_ns
        while not done.is_set():
            started = ns()
            await asyncio.sleep(0.001)
            lags.append(max(0, ns() - started - 1_000_000))

    async def producer() -> int:
        n = spec["warmup"] if not spec.get("idle") else 0
        first = n
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= spec["seconds"]:
                break
            due = first + int(spec["rate"] * elapsed)
            while n < due:
                info(MESSAGE, NAMES[n & 63], n)
                n += 1
            await asyncio.sleep(0.001)
        return n

    tick = asyncio.ensure_future(ticker())
    if spec.get("idle"):
        await asyncio.sleep(spec["seconds"])
        logged = 0
    else:
        logged = await producer()
    done.set()
    await tick
    await _aclose(built)
    return {"samples": lags, "logged": logged}


async def _settle(built: Built) -> None:
    """Let the warm-up's backlog be written before measuring."""
    aflush = getattr(built.handler, "aflush", None)
    if aflush is not None:
        await aflush()
    elif built.path is not None:
        await asyncio.get_running_loop().run_in_executor(None, built.handler.flush)


async def _aclose(built: Built) -> None:
    aclose = getattr(built.handler, "aclose", None)
    if aclose is not None:
        await aclose()


def main() -> None:
    spec = json.loads(sys.argv[1])
    built = build(spec["handler"], spec["dir"], spec.get("endpoint"))
    if spec["mode"] == "sync":
        result = run_sync(spec, built)
    elif spec["mode"] == "pace":
        result = run_pace(spec, built)
    elif spec["mode"] == "cpu":
        result = run_cpu(spec, built)
    elif spec["mode"] == "error":
        result = run_error(spec, built)
    elif spec["mode"] == "coroutine":
        result = asyncio.run(run_coroutine(spec, built))
    else:
        result = asyncio.run(run_lag(spec, built))
    if not result.get("closed"):
        built.close()  # drains (async handlers are already closed: a no-op)
    stats = built.stats()
    lines = count_lines(built.path) if built.path is not None else None
    dropped = int(stats.get("dropped_count", 0))
    # Dropping writes a warning line every DROP_WARNING_EVERY drops.
    expected = result["logged"] - dropped + dropped // DROP_WARNING_EVERY
    out = {"percentiles": result.get("metrics") or percentiles(result["samples"]),
           "samples": len(result["samples"]) or result["logged"],
           "seconds": sum(result["samples"]) / 1e9,
           "logged": result["logged"], "lines": lines, "dropped": dropped,
           "files": len(log_files(built.path)) if built.path else 0,
           "stats": {k: v for k, v in stats.items() if isinstance(v, (int, str))}}
    print(json.dumps(out), flush=True)
    if lines is not None and lines != expected:
        print(f"caller: {lines} lines in the files, expected {expected} "
              f"({result['logged']} logged, {dropped} reported dropped)", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
