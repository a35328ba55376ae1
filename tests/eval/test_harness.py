import json

import torch

from lmforge.cli import main
from lmforge.eval import harness, scoring
from lmforge.eval.tasks import GenExample, TaskSpec, make_task

from .conftest import make_model


def test_lmforge_eval_cli_over_checkpoints(ckpt_dir, tok_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"query": f"Question {i}: the sky is", "choices": ["blue", "green", "loud"], "gold": 0}) + "\n" for i in range(6)))
    (tmp_path / "mine.toml").write_text('name = "mine"\ndata = "mine.jsonl"\nnum_fewshot = 1\nmetrics = ["acc", "acc_tok"]\n')
    rc = main(["eval", str(ckpt_dir), "--tokenizer", str(tok_dir), "--tasks", f"perplexity,dictionary,cloze,{tmp_path / 'mine.toml'}",
               "--limit", "12", "--out", str(out), "--eval.docs_per_source=2", "--eval.bootstrap=50"])
    assert rc == 0
    for step in ("step_000010", "step_000020"):
        for task in ("perplexity", "dictionary", "cloze"):
            r = json.loads((out / step / f"{task}.json").read_text())
            assert r["task"] == task and r["step"] == int(step[5:])
    mine = json.loads((out / "step_000020" / "mine.json").read_text())
    assert mine["n"] == 3 and set(mine["metrics"]) == {"acc", "acc_tok"} and abs(mine["random"] - 1 / 3) < 1e-9
    d = json.loads((out / "step_000020" / "dictionary.json").read_text())
    assert d["n"] == 12 and set(d["metrics"]) == {"acc", "acc_norm", "acc_tok", "acc_pmi"} and d["random"] == 0.25
    p = json.loads((out / "step_000010" / "perplexity.json").read_text())
    assert {"bpb", "loss", "ppl", "bpb/gcide", "bpb/manpage"} <= set(p["metrics"])
    assert p["metrics"]["bpb"] > 0 and abs(p["metrics"]["ppl"] - torch.tensor(p["metrics"]["loss"]).exp().item()) < 1e-3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"step_000010", "step_000020"}
    assert (out / "eval.png").is_file()
    assert "dictionary acc" in capsys.readouterr().out
    # resume: existing results are kept, not recomputed
    before = (out / "step_000010" / "cloze.json").stat().st_mtime_ns
    assert main(["eval", str(ckpt_dir), "--tokenizer", str(tok_dir), "--tasks", "cloze", "--limit", "12", "--out", str(out)]) == 0
    assert (out / "step_000010" / "cloze.json").stat().st_mtime_ns == before


def test_cli_errors_are_one_line(ckpt_dir, tok_dir, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--tokenizer", str(tok_dir)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", str(ckpt_dir), "--tokenizer", str(tok_dir), "--tasks", "squad"]) == 2
    assert "unknown task 'squad'" in capsys.readouterr().err
    assert main(["eval", str(ckpt_dir), "--tokenizer", str(tok_dir), "--eval.limt=3"]) == 2
    assert "eval.limt" in capsys.readouterr().err
    assert main(["eval", str(ckpt_dir), "--tokenizer", str(tok_dir), "--checkpoints", "7"]) == 2


def test_generative_greedy_matches_argmax_decoding(tok_dir):
    tok = harness.load_tok(tok_dir)
    model = make_model(3).eval()
    prompt = "The word means"
    ids = [tok.bos_id] + tok.encode(prompt)
    x = torch.tensor([ids])
    gen = []
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(x)
            nxt = int(logits[0, -1].argmax())
            gen.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    expected = tok.decode(gen).strip()
    spec = TaskSpec(name="g", type="generative", data="-", max_new_tokens=6)
    spec.validate()
    task = make_task(spec, [GenExample(prompt, [expected], stop=[]), GenExample(prompt, ["zzz"], stop=[])])
    r = harness.eval_generative(model, tok, task, bootstrap=0)
    assert r["samples"][0]["prediction"] == expected
    assert r["metrics"] == {"exact_match": 0.5, "f1": 0.5}
    assert harness.cut_at_stop(" cat sat. more", [".", "\n"]) == "cat sat"


def test_on_eval_hook_returns_flat_metrics(tok_dir, tmp_path):
    hook = harness.make_on_eval(tok_dir, ["dictionary", "perplexity"], limit=8, out_dir=tmp_path, docs_per_source=2)
    model = make_model(0)
    model.train()
    m = hook(5, model)
    assert model.training
    assert {"eval/dictionary/acc", "eval/perplexity/bpb"} <= set(m)
    assert (tmp_path / "step_000005" / "dictionary.json").is_file()


def test_mc_accuracy_is_perfect_when_gold_is_the_model_favourite(tok_dir):
    """A task whose gold choice is, by construction, the model's most likely continuation."""
    from lmforge.eval.tasks import MCExample

    tok = harness.load_tok(tok_dir)
    model = make_model(1).eval()
    exs = []
    for q in ["A small", "The river", "Of or pertaining"]:
        conts = [" cat", " house", " water", " stone"]
        s = scoring.score_trees(model, [scoring.TreeRequest([tok.bos_id] + tok.encode(q), tok.encode_batch(conts))])[0]
        best = max(range(4), key=lambda k: s[k][0])
        exs.append(MCExample(q, [c[1:] for c in conts], [best]))
    spec = TaskSpec(name="m", data="-", metrics=["acc"])
    spec.validate()
    r = harness.eval_multiple_choice(model, tok, make_task(spec, exs), bootstrap=0)
    assert r["metrics"]["acc"] == 1.0 and r["n"] == 3
