"""Executors run a function over a list of tasks (one per shard or slice), resumably.

Each finished task leaves a marker `<marker_dir>/<task_id>.json` holding its (JSON) result;
a rerun skips tasks whose marker exists and returns the stored result. A task must write
its outputs atomically before it returns, so a killed run restarts exactly at the first
unfinished task.

`LocalExecutor` uses multiprocessing; Ray and Slurm executors implement the same `map`.
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.log import logger, progress
from lmforge.rundir import atomic_write_json, read_json


def marker_path(marker_dir: Path, task_id: str) -> Path:
    return Path(marker_dir) / f"{task_id}.json"


def _run_one(args: tuple[Callable, Any, str, str]) -> tuple[str, Any]:
    fn, task, task_id, marker_dir = args
    result = fn(task)
    atomic_write_json(marker_path(Path(marker_dir), task_id), {"task_id": task_id, "result": result})
    return task_id, result


class Executor(abc.ABC):
    """Base: `map(fn, tasks, task_ids, marker_dir)` -> results in task order."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)

    def pending(self, task_ids: Sequence[str], marker_dir: Path) -> tuple[dict[str, Any], list[int]]:
        done, todo = {}, []
        for i, tid in enumerate(task_ids):
            m = read_json(marker_path(marker_dir, tid))
            if m is not None and m.get("task_id") == tid:
                done[tid] = m["result"]
            else:
                todo.append(i)
        return done, todo

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], task_ids: Sequence[str], marker_dir: str | Path, desc: str = "tasks") -> list[Any]:
        """Run fn(task) for every task not yet marked complete; return all results in task order."""


class LocalExecutor(Executor):
    """multiprocessing pool on this machine (workers=1 runs in-process, easiest to debug)."""

    def map(self, fn, tasks, task_ids, marker_dir, desc="tasks"):
        marker_dir = Path(marker_dir)
        marker_dir.mkdir(parents=True, exist_ok=True)
        done, todo = self.pending(task_ids, marker_dir)
        if done:
            logger.info("%s: %d/%d tasks already complete, resuming", desc, len(done), len(task_ids))
        jobs = [(fn, tasks[i], task_ids[i], str(marker_dir)) for i in todo]
        results = dict(done)
        if jobs:
            if self.workers == 1 or len(jobs) == 1:
                it = map(_run_one, jobs)
                for tid, res in progress(it, desc=desc, total=len(jobs), unit="task"):
                    results[tid] = res
            else:
                ctx = mp.get_context("forkserver" if os.name != "nt" else "spawn")
                with ctx.Pool(min(self.workers, len(jobs))) as pool:
                    for tid, res in progress(pool.imap_unordered(_run_one, jobs), desc=desc, total=len(jobs), unit="task"):
                        results[tid] = res
        return [results[t] for t in task_ids]
