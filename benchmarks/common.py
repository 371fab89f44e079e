"""Helpers shared by the benchmark scripts: synchronised wall-clock timing, the machine's measured dense matmul FLOP/s
(the yardstick for "fraction of peak"), and the command line: options from a config dataclass, then the report as
the one-JSON-object last line every script prints."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from jsonargparse import ArgumentParser

Config = TypeVar("Config")


class Timing(NamedTuple):
    """Wall-clock time of `calls` consecutive calls, measured as one block."""

    seconds: float
    """Total seconds of the timed calls (warm-up calls excluded)."""
    calls: int
    """Number of timed calls."""

    @property
    def per_call(self) -> float:
        return self.seconds / self.calls


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work; a no-op on CPU, where work is synchronous."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device | str = "cpu") -> Timing:
    """Run `fn` `warmup` times untimed, then time `repeats` calls with `time.perf_counter`; the device (where `fn`
    queues its work) is synchronised only before and after the timed block, not between calls, so asynchronous
    devices keep their queue full as they would in a real loop."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_call needs warmup >= 0 and repeats >= 1; got warmup={warmup}, repeats={repeats}.")
    synchronize = synchronizer(device)
    for _ in range(warmup):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return Timing(time.perf_counter() - start, repeats)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (`repeats` rounds after `warmup` untimed ones):
    alternating the candidates spreads a change of machine load over all of them, so their ratio stays fair on a
    shared machine where consecutive blocks (`time_call` each) would not be; the median drops a disturbed round."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_interleaved needs warmup >= 0 and repeats >= 1; got {warmup=}, {repeats=}.")
    synchronize = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def matmul_flops_per_second(m: int, k: int, n: int, device: torch.device | str, dtype: torch.dtype,
                            warmup: int = 1, repeats: int = 3) -> float:
    """Measured FLOP/s of a dense `[m, k] × [k, n]` `torch.mm` (2·m·k·n FLOPs each) on `device` in `dtype`, its
    output buffer reused (`out=`) so that the figure is the matmul itself, not the allocator."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(m, n, device=device, dtype=dtype)
    timing = time_call(lambda: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, device=device)
    return 2 * m * k * n / timing.per_call


def machine_description(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: the processor or GPU, CPU threads and the torch version."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_name()
    return {"device": name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def benchmark_main(config_class: type[Config], run: Callable[[Config], dict[str, Any]],
                   doc: str) -> Callable[[list[str] | None], dict[str, Any]]:
    """A script's `main(args=None)`: one option per field of the dataclass `config_class` (a dataclass field's own
    fields as dotted options, `--sae.d`) parsed from `args` (`None`: the command line) with the first paragraph of
    `doc` as description; then `run`, and its report printed as one JSON line (the last, which harnesses parse; NaN
    and inf are refused) and returned."""
    def main(args: list[str] | None = None) -> dict[str, Any]:
        parser = ArgumentParser(description=doc.split("\n\n")[0])
        parser.add_class_arguments(config_class)
        report = run(config_class(**parser.instantiate(parser.parse_args(args)).as_dict()))
        print(json.dumps(report, allow_nan=False), flush=True)
        return report
    return main
