"""The data stage end to end: the bundled demo through `lmforge run`, the `lmforge data`
commands, bad configuration and bad paths as one clear message."""

import json
import shutil

import pytest

from lmforge.cli import main
from lmforge.data.corpus_io import iter_corpus
from lmforge.recipe import DEMO_RECIPE

from .test_pipeline import ALL_OFF_TOML


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`lmforge run` on the bundled demo recipe (data stage), once for this module."""
    rd = tmp_path_factory.mktemp("demo") / "run"
    assert main(["run", str(DEMO_RECIPE), "--run-dir", str(rd), "--stages", "data", "--workers", "2"]) == 0
    return rd


def test_demo_data_stage_end_to_end(demo_run):
    c = demo_run / "corpus"
    m = json.loads((c / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "data"
    st = json.loads((c / "stats.json").read_text())
    names = [s["name"] for s in st["steps"]]
    assert names[0] == "read" and "exact_dedup" in names
    assert st["totals"]["docs_read"] == 90 + 325 + 1500 + 6000 + 60
    assert set(st["sources"]) == {"web", "manpages", "fortunes", "dictionary", "code"}
    docs = list(iter_corpus(c))
    assert len(docs) == st["totals"]["docs_out"] == m["counts"]["docs_out"] > 0
    assert all(d.metadata["source"] in st["sources"] for d in docs)
    assert any(d.metadata["source"] == "code" for d in docs)  # code skips langid and filters
    assert len({d.id for d in docs}) == len(docs)
    assert (c / "parquet" / "shard_00000.parquet").is_file()
    assert (c / "funnel.png").read_bytes()[:4] == b"\x89PNG"
    report = (demo_run / "report.md").read_text()
    assert "| step | docs in | docs out |" in report and "exact_dedup" in report and "corpus/funnel.png" in report
    assert not (c / ".work").exists()


def test_demo_rerun_is_skipped(demo_run, capsys):
    before = (demo_run / "corpus" / "manifest.json").read_text()
    assert main(["run", str(DEMO_RECIPE), "--run-dir", str(demo_run), "--stages", "data", "--workers", "2"]) == 0
    assert (demo_run / "corpus" / "manifest.json").read_text() == before


def test_data_stats_and_inspect_commands(demo_run, capsys, tmp_path):
    assert main(["data", "stats", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "docs in" in out and "exact_dedup" in out and "dictionary" in out
    assert main(["data", "inspect", str(demo_run / "corpus"), "--step", "exact_dedup", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "== exact_dedup" in out and "-- reason: duplicate" in out and out.count("   [") == 2
    assert main(["data", "inspect", str(demo_run)]) == 0
    assert "top domains by kept tokens" in capsys.readouterr().out
    assert main(["data", "inspect", str(demo_run), "--step", "nosuchstep"]) == 2
    assert "no removed samples for step 'nosuchstep'" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "no stats.json" in capsys.readouterr().err


def test_bare_data_toml_and_bad_input(tmp_path, sample_dir, capsys):
    shutil.copy(sample_dir / "multilingual" / "fortunes-sample.jsonl.zst", tmp_path / "f.jsonl.zst")
    toml = tmp_path / "data.toml"
    toml.write_text(f'inputs = [{{ path = "f.jsonl.zst", source = "fortunes" }}]\n{ALL_OFF_TOML}')
    assert main(["data", "run", str(toml), "--run-dir", str(tmp_path / "r"), "--workers", "1"]) == 0
    st = json.loads((tmp_path / "r" / "corpus" / "stats.json").read_text())
    assert st["totals"]["docs_read"] == 1500 and st["steps"][1]["dropped"]["duplicate"] > 0
    toml.write_text('inputs = ["missing/*.warc.gz"]\n')
    assert main(["data", "run", str(toml), "--run-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "matches no file" in err and "Traceback" not in err


@pytest.mark.parametrize("bad,needle", [
    ("shard_docs = 0", "shard_docs must be >= 1"),
    ("shard_dcs = 5", "data.shard_dcs"),
    ("[executor]\nkind = \"mpi\"", "data.executor.kind"),
    ("[executor]\nworkrs = 2", "data.executor.workrs"),
])
def test_bad_config_names_the_key(tmp_path, capsys, bad, needle):
    toml = tmp_path / "data.toml"
    toml.write_text(f'inputs = ["x.jsonl"]\n{bad}\n')
    (tmp_path / "x.jsonl").write_text("")
    assert main(["data", "run", str(toml), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_input_entry_names_itself(tmp_path, capsys):
    toml = tmp_path / "recipe.toml"
    toml.write_text('[run]\nstages = ["data"]\n[data]\ninputs = [{ path = "x.jsonl", skipp = ["pii"] }]\n')
    assert main(["data", "run", str(toml), "--run-dir", str(tmp_path / "r")]) == 2
    assert "data.inputs[0].skipp" in capsys.readouterr().err


def test_inspect_html_page(demo_run, tmp_path):
    pytest.importorskip("lmforge.data.report_html")
    out = tmp_path / "inspect.html"
    assert main(["data", "inspect", str(demo_run), "--html", str(out)]) == 0
    page = out.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "exact_dedup" in page
