"""Executors: resume from markers, a dying worker, Slurm array scripts (by hand and through a
stand-in sbatch), Ray on a local instance; the same pipeline output on every engine."""

import os
import stat
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data import pipeline as P
from lmforge.data.executor import LocalExecutor, RayExecutor, SlurmExecutor, TasksPending, WorkerFailed

from .test_pipeline import cfg_for, make_inputs, shard_bytes


def square_logged(task):
    """Square task["x"], logging the call; die (the whole worker process) when asked to."""
    Path(task["log"]).mkdir(exist_ok=True)
    if task.get("die") and not Path(task["die"]).exists():
        os._exit(17)
    (Path(task["log"]) / f"{task['x']}.{os.getpid()}.{len(os.listdir(task['log']))}").write_text("")
    return task["x"] ** 2


def calls(log: Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in log.iterdir())


def test_local_resumes_from_markers(tmp_path):
    log = tmp_path / "log"
    tasks = [{"x": i, "log": str(log)} for i in range(5)]
    ids = [f"t{i}" for i in range(5)]
    assert LocalExecutor(1).map(square_logged, tasks, ids, tmp_path / "m") == [0, 1, 4, 9, 16]
    assert calls(log) == [0, 1, 2, 3, 4]
    (tmp_path / "m" / "t3.json").unlink()
    assert LocalExecutor(1).map(square_logged, tasks, ids, tmp_path / "m") == [0, 1, 4, 9, 16]
    assert calls(log) == [0, 1, 2, 3, 3, 4]  # only the unmarked task ran again


def test_dying_worker_stops_the_run_and_rerun_resumes(tmp_path):
    log, flag = tmp_path / "log", tmp_path / "may_live"
    tasks = [{"x": i, "log": str(log), "die": str(flag) if i == 4 else None} for i in range(8)]
    ids = [f"t{i}" for i in range(8)]
    ex = LocalExecutor(2)
    with pytest.raises(WorkerFailed, match="worker process died.*rerun to resume"):
        ex.map(square_logged, tasks, ids, tmp_path / "m")
    ex.close()
    before = {p.stem for p in (tmp_path / "m").glob("*.json")}
    assert "t4" not in before
    flag.write_text("")
    ex = LocalExecutor(2)
    assert ex.map(square_logged, tasks, ids, tmp_path / "m") == [i * i for i in range(8)]
    ex.close()
    ran_twice = [x for x in set(calls(log)) if calls(log).count(x) > 1]
    assert not any(f"t{x}" in before for x in ran_twice)  # completed tasks never rerun


def test_slurm_script_and_run_task_by_hand(tmp_path, capsys):
    log = tmp_path / "log"
    tasks = [{"x": i, "log": str(log)} for i in range(3)]
    ids = ["a", "b", "c"]
    ex = SlurmExecutor(1, partition="cpu", time="01:00:00", cpus_per_task=4, mem="2G", submit=False)
    with pytest.raises(TasksPending) as e:
        ex.map(square_logged, tasks, ids, tmp_path / "m", desc="demo phase")
    script = e.value.script
    text = script.read_text()
    assert e.value.n_tasks == 3 and script == tmp_path / "m" / "_slurm" / "job.sbatch"
    for line in ["#SBATCH --array=0-2", "#SBATCH --partition=cpu", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=2G",
                 "#SBATCH --time=01:00:00", "-m lmforge data run-task", '--index "$SLURM_ARRAY_TASK_ID"']:
        assert line in text
    assert os.stat(script).st_mode & stat.S_IXUSR
    assert main(["data", "run-task", str(script.parent), "--index", "1"]) == 0
    with pytest.raises(TasksPending) as e2:  # two left: the script is rewritten for those only
        ex.map(square_logged, tasks, ids, tmp_path / "m", desc="demo phase")
    assert e2.value.n_tasks == 2 and "--array=0-1" in script.read_text()
    for i in range(2):
        assert main(["data", "run-task", str(script.parent), "--index", str(i)]) == 0
    assert ex.map(square_logged, tasks, ids, tmp_path / "m") == [0, 1, 4]
    assert main(["data", "run-task", str(script.parent), "--index", "7"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_pipeline_on_slurm_by_hand_equals_local(tmp_path):
    make_inputs(tmp_path / "in")
    P.run_pipeline(cfg_for(tmp_path / "in"), tmp_path / "local", ".", workers=2)
    cfg = cfg_for(tmp_path / "in", **{"executor.kind": "slurm", "executor.slurm_submit": False})
    phases = 0
    while True:
        try:
            P.run_pipeline(cfg, tmp_path / "slurm", ".")
            break
        except TasksPending as e:
            phases += 1
            for i in range(e.n_tasks):
                assert main(["data", "run-task", str(e.script.parent), "--index", str(i)]) == 0
        assert phases < 10
    assert phases == 5  # stream, dedup hash, dedup filter, scrub, write
    assert shard_bytes(tmp_path / "slurm") == shard_bytes(tmp_path / "local")


def test_pipeline_through_sbatch_wait(tmp_path, monkeypatch):
    """A stand-in `sbatch --wait` that runs every array index of the script with bash."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(
        "#!/bin/bash\n"
        'script="${@: -1}"\n'
        "last=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\).*/\\1/p' \"$script\")\n"
        "for i in $(seq 0 $last); do SLURM_ARRAY_TASK_ID=$i bash \"$script\" || exit 1; done\n"
    )
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LMFORGE_PROGRESS", "0")
    make_inputs(tmp_path / "in")
    one = {"inputs": [{"path": str(tmp_path / "in" / "a.jsonl.gz"), "source": "a"}], "shard_docs": 1000}
    P.run_pipeline(cfg_for(tmp_path / "in", **one), tmp_path / "local", ".")
    P.run_pipeline(cfg_for(tmp_path / "in", **one, **{"executor.kind": "slurm"}), tmp_path / "slurm", ".")
    assert shard_bytes(tmp_path / "slurm") == shard_bytes(tmp_path / "local")
    assert list((tmp_path / "slurm").glob("shard_*.jsonl.zst"))


def test_ray_local_instance_gives_same_output(tmp_path):
    pytest.importorskip("ray")
    make_inputs(tmp_path / "in")
    P.run_pipeline(cfg_for(tmp_path / "in"), tmp_path / "local", ".")
    ex = RayExecutor(1)
    try:
        P.run_pipeline(cfg_for(tmp_path / "in"), tmp_path / "ray", ".", executor=ex)
    finally:
        ex.close()
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
