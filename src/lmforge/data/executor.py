"""Executors run a function over a list of tasks (one per shard or slice), resumably.

Each finished task leaves a marker `<marker_dir>/<task_id>.json` holding its (JSON) result;
a rerun skips tasks whose marker exists and returns the stored result. A task must write
its outputs atomically before it returns, so a killed run restarts exactly at the first
unfinished task.

The same `map(fn, tasks, task_ids, marker_dir)` runs on three engines:

- `LocalExecutor`: a process pool on this machine (workers=1 runs in-process). A worker
  that dies (killed, out of memory) stops the run with a clear error; rerunning resumes.
- `RayExecutor`: one Ray task per pipeline task, on a Ray cluster (`address`) or a local
  Ray instance started for the run. Markers and outputs must be on storage all nodes share.
- `SlurmExecutor`: writes, per phase, `<marker_dir>/_slurm/job.sbatch` (an array job, one
  index per pending task) and `tasks.pkl`; each array index runs
  `python -m lmforge data run-task <marker_dir>/_slurm --index N`. With `sbatch` on PATH the
  executor submits the array with `sbatch --wait` and continues; without it (or with
  `slurm_submit = false`) it stops with `TasksPending`, naming the script: run it (or each
  index by hand), then rerun the same command, which resumes at the next phase.
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.errors import LmforgeError
from lmforge.log import logger, progress
from lmforge.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


class TasksPending(LmforgeError):
    """Tasks were handed to a scheduler that runs them later (Slurm without --wait)."""

    exit_code = 3

    def __init__(self, message: str, script: Path | None = None, n_tasks: int = 0):
        super().__init__(message)
        self.script = script
        self.n_tasks = n_tasks


class WorkerFailed(LmforgeError):
    """A worker process died or a task raised; completed tasks are kept for the rerun."""


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

    def _prepare(self, tasks, task_ids, marker_dir, desc) -> tuple[dict, list]:
        if len(set(task_ids)) != len(task_ids):
            raise ValueError(f"{desc}: task ids must be unique")
        marker_dir = Path(marker_dir)
        marker_dir.mkdir(parents=True, exist_ok=True)
        done, todo = self.pending(task_ids, marker_dir)
        if done and todo:
            logger.info("%s: %d/%d tasks already complete, resuming", desc, len(done), len(task_ids))
        return dict(done), todo

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], task_ids: Sequence[str], marker_dir: str | Path, desc: str = "tasks") -> list[Any]:
        """Run fn(task) for every task not yet marked complete; return all results in task order."""

    def close(self) -> None:
        """Release pools / cluster connections this executor started."""


class LocalExecutor(Executor):
    """A process pool on this machine (workers=1 runs in-process, easiest to debug)."""

    def __init__(self, workers: int = 1):
        super().__init__(workers)
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("forkserver" if os.name != "nt" else "spawn")
            if os.name != "nt":
                # the fork server imports the pipeline once; workers fork from it ready to run
                ctx.set_forkserver_preload(["lmforge.data.pipeline"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def map(self, fn, tasks, task_ids, marker_dir, desc="tasks"):
        results, todo = self._prepare(tasks, task_ids, marker_dir, desc)
        jobs = [(fn, tasks[i], task_ids[i], str(marker_dir)) for i in todo]
        if jobs:
            if self.workers == 1 or len(jobs) == 1:
                for tid, res in progress(map(_run_one, jobs), desc=desc, total=len(jobs), unit="task"):
                    results[tid] = res
            else:
                from concurrent.futures import as_completed
                from concurrent.futures.process import BrokenProcessPool

                pool = self._get_pool()
                futs = [pool.submit(_run_one, j) for j in jobs]
                try:
                    for fut in progress(as_completed(futs), desc=desc, total=len(jobs), unit="task"):
                        tid, res = fut.result()
                        results[tid] = res
                except BrokenProcessPool:
                    self._pool = None
                    raise WorkerFailed(
                        f"{desc}: a worker process died (killed or out of memory); "
                        f"{len(results)}/{len(task_ids)} tasks are complete and kept - rerun to resume"
                    ) from None
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        return [results[t] for t in task_ids]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """One Ray task per pipeline task. `address=""` starts a local Ray instance with `workers` CPUs."""

    def __init__(self, workers: int = 1, address: str = ""):
        super().__init__(workers)
        self.address = address
        self._started = False

    def _init(self):
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            self._started = True
        return ray

    def map(self, fn, tasks, task_ids, marker_dir, desc="tasks"):
        results, todo = self._prepare(tasks, task_ids, marker_dir, desc)
        if not todo:
            return [results[t] for t in task_ids]
        ray = self._init()
        remote = ray.remote(num_cpus=1, max_retries=2)(_run_one)
        refs = [remote.remote((fn, tasks[i], task_ids[i], str(marker_dir))) for i in todo]
        pending = list(refs)
        bar = progress(range(len(refs)), desc=desc, total=len(refs), unit="task")
        it = iter(bar)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    tid, res = ray.get(r)
                    results[tid] = res
                    next(it, None)
        except ray.exceptions.RayError as e:
            raise WorkerFailed(f"{desc}: a Ray task failed ({type(e).__name__}: {str(e).splitlines()[0]}); completed tasks are kept - rerun to resume") from None
        return [results[t] for t in task_ids]

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
#SBATCH --time={time}
#SBATCH --output={logs}/%A_%a.out
{partition}
# lmforge data pipeline, phase "{desc}": {n} task(s). Each array index runs one task and
# leaves a marker in {marker_dir}; rerun the lmforge command afterwards to continue.
set -euo pipefail
cd {cwd}
exec {python} -m lmforge data run-task {slurm_dir} --index "$SLURM_ARRAY_TASK_ID"
"""


class SlurmExecutor(Executor):
    """Writes an sbatch array script per phase; submits it with `sbatch --wait` when possible."""

    def __init__(self, workers: int = 1, partition: str = "", time: str = "04:00:00", cpus_per_task: int = 2, mem: str = "8G", submit: bool = True):
        super().__init__(workers)
        self.partition, self.time, self.cpus, self.mem, self.submit = partition, time, cpus_per_task, mem, submit

    def write_script(self, fn, tasks, task_ids, todo, marker_dir: Path, desc: str) -> Path:
        sdir = Path(marker_dir) / "_slurm"
        jobs = [(fn, tasks[i], task_ids[i], str(Path(marker_dir).resolve())) for i in todo]
        atomic_write_bytes(sdir / "tasks.pkl", pickle.dumps(jobs))
        (sdir / "logs").mkdir(parents=True, exist_ok=True)
        script = SBATCH_TEMPLATE.format(
            job_name=shlex.quote("lmforge-" + "".join(c if c.isalnum() else "-" for c in desc)),
            last=len(jobs) - 1, cpus=self.cpus, mem=self.mem, time=self.time,
            logs=shlex.quote(str((sdir / "logs").resolve())),
            partition=f"#SBATCH --partition={self.partition}" if self.partition else "",
            desc=desc, n=len(jobs), marker_dir=Path(marker_dir).resolve(), cwd=shlex.quote(os.getcwd()),
            python=shlex.quote(sys.executable), slurm_dir=shlex.quote(str(sdir.resolve())),
        )
        path = sdir / "job.sbatch"
        atomic_write_text(path, script)
        os.chmod(path, 0o755)
        return path

    def map(self, fn, tasks, task_ids, marker_dir, desc="tasks"):
        results, todo = self._prepare(tasks, task_ids, marker_dir, desc)
        if not todo:
            return [results[t] for t in task_ids]
        script = self.write_script(fn, tasks, task_ids, todo, Path(marker_dir), desc)
        sbatch = shutil.which("sbatch")
        if not (self.submit and sbatch):
            raise TasksPending(
                f"{desc}: {len(todo)} task(s) written to the Slurm array script {script}; "
                f"submit it (`sbatch {script}`) or run `lmforge data run-task {script.parent} --index N` for N in 0..{len(todo) - 1}, "
                "then rerun this command to continue",
                script, len(todo),
            )
        logger.info("%s: submitting %d tasks: sbatch --wait %s", desc, len(todo), script)
        r = subprocess.run([sbatch, "--wait", str(script)], capture_output=True, text=True)
        results, todo = self._prepare(tasks, task_ids, marker_dir, desc)
        if todo:
            raise WorkerFailed(
                f"{desc}: {len(todo)} Slurm task(s) did not complete (sbatch exit {r.returncode}: {r.stderr.strip()[:200]}); "
                f"logs in {script.parent / 'logs'}; rerun to resume"
            )
        return [results[t] for t in task_ids]


def run_slurm_task(slurm_dir: str | Path, index: int) -> str:
    """The per-task entry point of a Slurm array job: run pending task `index` of a phase."""
    from lmforge.errors import InputError

    path = Path(slurm_dir) / "tasks.pkl"
    if not path.is_file():
        raise InputError(f"{path} not found: give the _slurm directory written by the Slurm executor")
    # tasks.pkl is written by lmforge itself for this run (never by a third party)
    jobs = pickle.loads(path.read_bytes())
    if not 0 <= index < len(jobs):
        raise InputError(f"task index {index} out of range: this phase has {len(jobs)} task(s) (0..{len(jobs) - 1})")
    fn, task, task_id, marker_dir = jobs[index]
    if read_json(marker_path(Path(marker_dir), task_id)):
        return task_id
    _run_one(jobs[index])
    return task_id


def make_executor(cfg, workers: int) -> Executor:
    """An executor for `[data.executor]` (ExecutorConfig); `workers` = resolved worker count."""
    if cfg.kind == "local":
        return LocalExecutor(workers)
    if cfg.kind == "ray":
        return RayExecutor(workers, cfg.ray_address)
    return SlurmExecutor(workers, cfg.slurm_partition, cfg.slurm_time, cfg.slurm_cpus_per_task, cfg.slurm_mem, getattr(cfg, "slurm_submit", True))
