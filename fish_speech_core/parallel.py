"""Run a function over many inputs in worker processes, with a progress bar, keeping order."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from fish_speech_core.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def map_with_progress(
    fn: Callable[[T], R],
    inputs: Sequence[T],
    num_workers: int,
    description: str,
    show_progress: bool = True,
    unit: str = "files",  # what an input is, for the bar (validate and normalize map files)
) -> list[R]:
    """``[fn(x) for x in inputs]`` on ``num_workers`` processes; results in input order.

    ``fn`` must catch its own per-item errors and return them as values: one bad item must
    never stop the others. An exception escaping ``fn`` (a bug, or an error that would stop
    every item, like a full disk) is re-raised and the items not yet started are dropped.
    """
    results: list[R | None] = [None] * len(inputs)
    with progress_bar(show=show_progress) as progress:
        task = progress.add_task(description, total=len(inputs), unit=unit)
        if num_workers <= 1 or len(inputs) <= 1:
            for index, value in enumerate(inputs):
                results[index] = fn(value)
                progress.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=min(num_workers, len(inputs))) as pool:
                futures = {pool.submit(fn, value): index for index, value in enumerate(inputs)}
                for future in as_completed(futures):
                    try:
                        results[futures[future]] = future.result()
                    except BaseException:
                        pool.shutdown(wait=False, cancel_futures=True)  # don't start the rest
                        raise
                    progress.advance(task)
    return results  # type: ignore[return-value]
