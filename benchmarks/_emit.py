"""Shared by the benchmark scripts (it imports nothing of dizoo_imgcls, so the stock runner may use it)."""
import json
import statistics
import time
from typing import Callable, Optional


def median_step_seconds(step: Callable[[], None], warmup: int, steps: int, cuda: bool = False) -> float:
    """Median seconds of ``steps`` single calls of ``step`` after ``warmup`` untimed ones. Each step is timed on
    its own: on a shared 2-core machine a mean over one block of steps swings by 15-20% with whatever else
    runs, the median of single steps much less. ``cuda``: synchronize around each step."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(result: dict, out: Optional[str], indent: Optional[int] = None) -> int:
    """Print ``result`` as JSON on stdout (the benchmark's one output) and write it to ``out`` when given."""
    text = json.dumps(result, indent=indent)
    if out:
        with open(out, 'w') as f:
            f.write(text + '\n')
    print(text, flush=True)
    return 0
