"""Config validation, atomic writes, manifests, recipe runner skip/resume, CLI errors."""

import io
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge import config as C
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.rundir import atomic_file, atomic_write_json, read_json, stage_complete, write_manifest


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    n: int = 1
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_build_validates_and_names_bad_key():
    o = C.build(Outer, {"n": 3, "names": ["x"], "inner": {"rate": 1, "mode": "b"}}, "sec")
    assert o.n == 3 and o.inner.rate == 1.0 and o.inner.mode == "b"
    with pytest.raises(ConfigError, match=r"sec\.inner\.rat.*did you mean 'rate'"):
        C.build(Outer, {"inner": {"rat": 1}}, "sec")
    with pytest.raises(ConfigError, match=r"sec\.inner\.mode.*choose one of"):
        C.build(Outer, {"inner": {"mode": "z"}}, "sec")
    with pytest.raises(ConfigError, match=r"sec\.n' must be an integer"):
        C.build(Outer, {"n": "three"}, "sec")


def test_overrides_parse_toml_values():
    raw = {"a": {"b": 1}}
    C.apply_overrides(raw, ["a.b=2.5", "a.c=[1, 2]", "d.e=hello", "d.f=true"])
    assert raw == {"a": {"b": 2.5, "c": [1, 2]}, "d": {"e": "hello", "f": True}}
    rest, ov = C.split_cli_overrides(["run", "x.toml", "--data.langid.threshold", "0.5", "--run.seed=3", "--force"])
    assert rest == ["run", "x.toml", "--force"] and ov == ["data.langid.threshold=0.5", "run.seed=3"]


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    p = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(p) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert not p.exists() and list(tmp_path.iterdir()) == []
    atomic_write_json(p, {"a": 1})
    assert read_json(p) == {"a": 1}


def test_manifest_matches_only_same_fingerprint(tmp_path):
    import time

    assert stage_complete(tmp_path, "abc") is None
    write_manifest(tmp_path, stage="s", fp="abc", config={}, counts={"n": 1}, started=time.time())
    assert stage_complete(tmp_path, "abc")["counts"] == {"n": 1}
    assert stage_complete(tmp_path, "other") is None


def test_cli_bad_config_key_is_one_clear_message(tmp_path, capsys):
    r = tmp_path / "r.toml"
    r.write_text('[run]\nname = "x"\nstages = ["data"]\n[data]\ninputs = []\nbogus_key = 1\n')
    code = main(["run", str(r), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.bogus_key" in err and "Traceback" not in err


def test_cli_unknown_stage_and_missing_recipe(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    r = tmp_path / "r.toml"
    r.write_text('[run]\nstages = ["bake"]\n')
    assert main(["run", str(r)]) == 2
    assert "unknown stage 'bake'" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout


def test_override_for_a_stage_not_in_the_recipe_is_validated(tmp_path, capsys):
    r = tmp_path / "r.toml"
    r.write_text('[run]\nname = "x"\nstages = ["data"]\n[data]\ninputs = []\n')
    code = main(["run", str(r), "--run-dir", str(tmp_path / "run"), "--pretrain.max_steps", "abc"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'pretrain.max_steps' must be an integer, got 'abc'" in err
    assert not (tmp_path / "run").exists()  # rejected before anything ran
    assert main(["run", str(r), "--run-dir", str(tmp_path / "run"), "--eval.no_such_key", "1"]) == 2
    assert "unknown config key 'eval.no_such_key'" in capsys.readouterr().err


def test_unused_override_is_reported(tmp_path):
    from lmforge.recipe import RunConfig, check_overrides, load_recipe

    r = tmp_path / "r.toml"
    r.write_text('[run]\nname = "x"\nstages = ["data"]\n[data]\ninputs = []\n')
    overrides = ["data.shard_docs=10", "pretrain.max_steps=50", "pretrain.lr=0.001", "run.seed=3"]
    raw, _ = load_recipe(r, overrides)
    run = C.build(RunConfig, raw["run"], "run")
    warnings = check_overrides(raw, run, overrides, run.stages)
    assert warnings == ["override --pretrain.max_steps, --pretrain.lr not used: stage 'pretrain' is not in run.stages (data)"]
    assert check_overrides(raw, run, ["data.shard_docs=10"], run.stages) == []
    # in the recipe but left out with --stages: validated with the recipe, reported as not run now
    two = RunConfig(stages=["data", "tokenizer"])
    assert check_overrides({}, two, {"tokenizer.vocab_size": 512}, ["data"]) == [
        "override --tokenizer.vocab_size not used: stage 'tokenizer' is not run this time (--stages data)"]


class _Pipe(io.StringIO):
    """A non-terminal stream, like a log file or a CI pipe."""

    def isatty(self) -> bool:
        return False


def test_progress_writes_plain_lines_when_not_a_terminal(monkeypatch):
    from lmforge import log

    monkeypatch.setenv("LMFORGE_PROGRESS", "1")
    out = _Pipe()
    monkeypatch.setattr(log, "LINE_INTERVAL_S", 0.0)  # a line at every update
    seen = list(log.progress(range(3, 8), desc="pretrain", total=10, unit="step", initial=3, file=out))
    assert seen == [3, 4, 5, 6, 7]
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 6  # one per step and a final one
    assert "pretrain: 4/10 step (40%)" in lines[0] and " step/s" in lines[0]
    assert "pretrain: 8/10 step (80%) done in" in lines[-1]

    out = _Pipe()
    monkeypatch.setattr(log, "LINE_INTERVAL_S", 3600.0)  # a fast job: only the final line
    bar = log.progress(None, desc="eval dictionary", total=40, unit="req", file=out)
    for _ in range(40):
        bar.update(1)
    bar.set_postfix(refresh=False, loss="3.210", acc=0.5)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in lines[0]
    assert "eval dictionary: 40/40 req (100%) done in" in lines[0] and lines[0].endswith("loss=3.210 acc=0.5")


def test_progress_is_a_bar_on_a_terminal_and_silent_when_off(monkeypatch):
    from lmforge import log

    class Tty(_Pipe):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("LMFORGE_PROGRESS", "1")
    bar = log.progress(range(3), desc="x", file=Tty())
    assert not isinstance(bar, log.LineProgress) and list(bar) == [0, 1, 2]
    monkeypatch.setenv("LMFORGE_PROGRESS", "0")
    out = _Pipe()
    assert list(log.progress(range(3), desc="x", file=out)) == [0, 1, 2] and out.getvalue() == ""


def test_a_stage_reruns_when_a_recipe_section_it_reads_changes(tmp_path, monkeypatch):
    """A stage whose work reads other recipe sections (the rounds stage reads [dpo], [sft], ...) is
    fingerprinted with them: changing such a section reruns it; an unrelated change does not."""
    from lmforge import recipe as R

    calls = []
    real_import = R._import

    def fake_import(path):
        if path == "probe:run":
            return lambda ctx: calls.append(ctx.name) or R.StageResult()
        return real_import(path)

    monkeypatch.setattr(R, "_import", fake_import)
    monkeypatch.setitem(R.STAGES, "probe", R.StageSpec("lmforge.eval.config:EvalConfig", "probe:run", "probe", sections=("dpo",)))
    recipe = tmp_path / "r.toml"

    def run(dpo_steps, rl_steps=5):
        recipe.write_text(f'[run]\nname = "p"\nstages = ["probe"]\n[probe]\nlimit = 100\n[dpo]\nmax_steps = {dpo_steps}\n'
                          f'[rl]\nmax_steps = {rl_steps}\n')
        R.run_recipe(recipe, run_dir=tmp_path / "run")

    run(10)
    run(10)
    assert calls == ["probe"]  # second run: the manifest matches, skipped
    run(10, rl_steps=7)
    assert calls == ["probe"]  # [rl] is not read by this stage: still skipped
    run(20)
    assert calls == ["probe", "probe"]  # [dpo] changed: rerun
