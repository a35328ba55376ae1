"""Config validation, atomic writes, manifests, recipe runner skip/resume, CLI errors."""

import json
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
