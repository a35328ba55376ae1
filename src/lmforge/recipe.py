"""Recipe runner: `lmforge run RECIPE.toml` runs the stages a recipe lists, in order, and
writes report.md. A completed stage (manifest fingerprint matches) is skipped on rerun; a
stage that was killed resumes through its own markers/checkpoints.

A recipe:

    [run]
    name = "demo"            # run directory = <dir>/<name>
    dir = "runs"
    stages = ["data", "tokenizer", "pretrain", "eval"]
    seed = 1234
    workers = 2

    [data]        # validated by the data stage's config dataclass
    ...
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.log import logger
from lmforge.rundir import RunDir, atomic_write_text, fingerprint, read_json, stage_complete, write_manifest

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_RECIPE = PACKAGE_DIR / "sample" / "demo.toml"


@dataclass
class StageSpec:
    config: str  # "module:DataclassName"
    run: str  # "module:function" taking a StageContext, returning a StageResult
    out: str  # output directory name inside the run directory
    after: tuple[str, ...] = ()  # stages whose output this one reads (their fingerprints feed ours)
    sections: tuple[str, ...] = ()  # other recipe sections this stage's work reads (they feed its fingerprint too)


# The stages a recipe can name, in pipeline order.
STAGES: dict[str, StageSpec] = {
    "data": StageSpec("lmforge.data.config:DataConfig", "lmforge.data.stage:run_stage", "corpus"),
    "tokenizer": StageSpec("lmforge.tokenizer.config:TokenizerConfig", "lmforge.tokenizer.stage:run_stage", "tokenizer", ("data",)),
    "pretrain": StageSpec("lmforge.train.config:TrainConfig", "lmforge.train.stage:run_stage", "checkpoints", ("tokenizer",)),
    "eval": StageSpec("lmforge.eval.config:EvalConfig", "lmforge.eval.stage:run_stage", "eval", ("pretrain",)),
    "sft": StageSpec("lmforge.posttrain.config:SFTConfig", "lmforge.posttrain.stage:run_stage", "sft", ("pretrain",)),
    "chat_eval": StageSpec("lmforge.eval.chat_stage:ChatEvalConfig", "lmforge.eval.chat_stage:run_stage", "chat_eval", ("sft",)),
    "rm": StageSpec("lmforge.posttrain.rm:RMConfig", "lmforge.posttrain.pref_stages:run_rm_stage", "rm", ("sft",)),
    "dpo": StageSpec("lmforge.posttrain.dpo:DPOConfig", "lmforge.posttrain.pref_stages:run_dpo_stage", "dpo", ("sft",)),
    "rl": StageSpec("lmforge.posttrain.rl:RLConfig", "lmforge.posttrain.rl_stage:run_stage", "rl", ("sft",)),
    "rejection": StageSpec("lmforge.posttrain.rejection:RejectionConfig", "lmforge.posttrain.rounds_stage:run_rejection_stage",
                           "rejection", ("sft", "rm")),
    "rounds": StageSpec("lmforge.posttrain.rounds:RoundsConfig", "lmforge.posttrain.rounds_stage:run_rounds_stage", "rounds",
                        ("sft", "rm"), sections=("sft", "dpo", "rl", "rm", "rejection")),
}


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs"
    stages: list[str] = field(default_factory=lambda: ["data"])
    seed: int = 1234
    workers: int = 0  # 0 = number of CPU cores (capped at 2 on CPU-only machines is not assumed)

    def validate(self) -> None:
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"run.stages: unknown stage {s!r}; known stages: {', '.join(STAGES)}")


@dataclass
class StageContext:
    """What a stage gets: its validated config, the run directory, and the recipe around it."""

    name: str
    cfg: Any
    run_dir: RunDir
    out: Path
    run: RunConfig
    base_dir: Path  # relative input paths in the recipe resolve against this
    recipe: dict
    fingerprint: str
    force: bool = False

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def workers(self) -> int:
        return self.run.workers or (os.cpu_count() or 1)

    def resolve(self, path: str | Path) -> Path:
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.base_dir / p)

    def stage_cfg(self, name: str) -> Any:
        """Validated config of another stage in the same recipe (e.g. eval reads pretrain's)."""
        return load_stage_config(name, self.recipe.get(name, {}))


@dataclass
class StageResult:
    counts: dict = field(default_factory=dict)  # headline numbers, stored in the manifest
    report: str = ""  # markdown section for report.md (paths relative to the run directory)
    extra: dict = field(default_factory=dict)


def _import(path: str) -> Any:
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def load_stage_config(name: str, section: dict) -> Any:
    return cfgmod.build(_import(STAGES[name].config), section, name)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict, Path]:
    path = Path(path) if path else DEMO_RECIPE
    raw = cfgmod.load_toml(path)
    cfgmod.apply_overrides(raw, overrides or [])
    unknown = [k for k in raw if k != "run" and k not in STAGES]
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section [{unknown[0]}]; allowed sections: run, {', '.join(STAGES)}")
    return raw, path.resolve().parent


def run_recipe(
    recipe_path: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> RunDir:
    raw, base = load_recipe(recipe_path, overrides)
    run = cfgmod.build(RunConfig, raw.get("run", {}), "run")
    stages = run.stages if not only else [s for s in run.stages if s in only]
    if only:
        for s in only:
            if s not in STAGES:
                raise ConfigError(f"--stages: unknown stage {s!r}; known stages: {', '.join(STAGES)}")
    # validate every stage's config before running anything
    cfgs = {s: load_stage_config(s, raw.get(s, {})) for s in run.stages}
    check_overrides(raw, run, overrides or [], stages)
    rd = RunDir(run_dir or Path(run.dir) / run.name).mkdir()
    atomic_write_text(rd / "recipe.toml", tomli_w.dumps(_resolved(raw, base)))
    fps: dict[str, str] = {}
    t_all = time.time()
    for name in run.stages:
        spec = STAGES[name]
        cfg = cfgs[name]
        up = {a: fps.get(a) or _manifest_fp(rd, a) for a in spec.after}
        inputs_fp = getattr(cfg, "input_fingerprint", None)
        fp = fingerprint({
            "stage": name,
            "config": cfgmod.to_dict(cfg),
            "seed": run.seed,
            "upstream": up,
            "inputs": inputs_fp(base) if callable(inputs_fp) else None,
            **({"sections": {sec: raw.get(sec, {}) for sec in spec.sections}} if spec.sections else {}),
        })
        fps[name] = fp
        out = rd / spec.out
        if name not in stages:
            continue
        if not force and (m := stage_complete(out, fp)):
            logger.info("stage %s: complete (manifest matches), skipped", name)
            continue
        logger.info("stage %s: running -> %s", name, out)
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(name=name, cfg=cfg, run_dir=rd, out=out, run=run, base_dir=base, recipe=raw, fingerprint=fp, force=force)
        t0 = time.time()
        result: StageResult = _import(spec.run)(ctx)
        atomic_write_text(out / "report.md", result.report or "")
        m = write_manifest(out, stage=name, fp=fp, config=cfgmod.to_dict(cfg), counts=result.counts, started=t0, extra=result.extra)
        logger.info("stage %s: done in %.1fs", name, m["wall_time_s"])
    write_report(rd, run)
    logger.info("run complete in %.1fs: %s", time.time() - t_all, rd.report)
    return rd


def check_overrides(raw: dict, run: RunConfig, overrides: list[str] | dict[str, Any], running: list[str]) -> list[str]:
    """Overrides that name a stage this run will not run: each such stage's section (recipe +
    overrides) is validated all the same (a bad value is a ConfigError naming the key, as for
    a stage that runs), and a warning says the override was not used. Returns the warnings."""
    by_stage: dict[str, list[str]] = {}
    for key in cfgmod.override_keys(overrides):
        section = key.split(".", 1)[0]
        if section in STAGES and section not in running:
            by_stage.setdefault(section, []).append(key)
    warnings = []
    for name, keys in by_stage.items():
        if name not in run.stages:
            load_stage_config(name, raw.get(name, {}))  # the stages in run.stages were validated already
            why = f"stage {name!r} is not in run.stages ({', '.join(run.stages) or 'none'})"
        else:
            why = f"stage {name!r} is not run this time (--stages {','.join(running) or 'none'})"
        msg = f"override {', '.join('--' + k for k in keys)} not used: {why}"
        logger.warning(msg)
        warnings.append(msg)
    return warnings


def _manifest_fp(rd: RunDir, stage: str) -> str | None:
    m = read_json(rd / STAGES[stage].out / "manifest.json")
    return m.get("fingerprint") if m else None


def _resolved(raw: dict, base: Path) -> dict:
    out = dict(raw)
    out.setdefault("run", {})
    out["run"] = dict(out["run"], recipe_dir=str(base))
    return out


def write_report(rd: RunDir, run: RunConfig) -> Path:
    """Assemble report.md from each completed stage's section."""
    parts = [f"# lmforge report: {run.name}\n", f"Run directory: `{rd.root}`  \nStages: {', '.join(run.stages)}\n"]
    for name in run.stages:
        out = rd / STAGES[name].out
        m = read_json(out / "manifest.json")
        if not m:
            parts.append(f"\n## {name}\n\n_not run yet_\n")
            continue
        section = (out / "report.md").read_text(encoding="utf-8") if (out / "report.md").exists() else ""
        parts.append(f"\n## {name}\n\n_{m.get('wall_time_s', 0):.1f} s, finished {m.get('finished_at', '')}_\n\n{section.strip()}\n")
    return atomic_write_text(rd.report, "\n".join(parts))


def rounded(v, nd: int = 4):
    """A figure for a manifest's counts: None stays None, numbers are rounded to `nd` places."""
    return None if v is None else round(float(v), nd)


def fmt(v, nd: int = 4) -> str:
    """A figure for a report table: '-' for None, else with thousands separators and `nd` places."""
    return "-" if v is None else f"{v:,.{nd}f}"


def stage_runner(name: str) -> Callable[[StageContext], StageResult]:
    return _import(STAGES[name].run)


def default_config(name: str) -> Any:
    return _import(STAGES[name].config)()


__all__ = ["STAGES", "StageContext", "StageResult", "RunConfig", "run_recipe", "load_recipe", "check_overrides"]
