import json
import shutil

from lmforge.model.io import save_model
from lmforge.recipe import run_recipe

from .conftest import make_model, write_corpus_jsonl


def test_eval_stage_in_a_recipe(tmp_path, tok_dir, tokens_dir):
    run = tmp_path / "run"
    shutil.copytree(tok_dir, run / "tokenizer")
    shutil.copytree(tokens_dir, run / "tokens")
    for step in (5, 10):
        save_model(make_model(step), run / "checkpoints" / "demo" / f"step_{step:06d}")
    write_corpus_jsonl(tmp_path / "docs.jsonl", "gcide", 0, 400)
    (tmp_path / "r.toml").write_text(
        '[run]\nname = "x"\nstages = ["eval"]\n\n[eval]\ntasks = ["perplexity", "dictionary"]\nlimit = 10\n'
        'docs = ["docs.jsonl"]\ndocs_per_source = 3\nval_docs = 4\nbootstrap = 50\n'
    )
    rd = run_recipe(tmp_path / "r.toml", run_dir=run)
    ev = run / "eval"
    m = json.loads((ev / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["checkpoints"] == 2 and "dictionary_acc" in m["counts"]
    p = json.loads((ev / "demo" / "step_000010" / "perplexity.json").read_text())
    assert {"bpb/gcide", "bpb/val"} <= set(p["metrics"]) and p["sources"]["val"]["docs"] == 4
    report = rd.report.read_text()
    assert "dictionary acc" in report and "eval/eval.png" in report and (ev / "eval.png").is_file()
    # rerun: manifest matches, nothing recomputed
    before = (ev / "demo" / "step_000005" / "dictionary.json").stat().st_mtime_ns
    run_recipe(tmp_path / "r.toml", run_dir=run)
    assert (ev / "demo" / "step_000005" / "dictionary.json").stat().st_mtime_ns == before
