import json
import random

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.plan import ablate

from .conftest import write_corpus_jsonl


def test_analyze_measures_monotonicity_noise_and_separation():
    steps = [10, 20, 30, 40]
    series = {"t/acc": {"random": 0.25, "lower": False, "runs": {
        "good": {"1": [[s, 0.3 + 0.1 * i] for i, s in enumerate(steps)], "2": [[s, 0.32 + 0.1 * i] for i, s in enumerate(steps)]},
        "bad": {"1": [[s, 0.3 + 0.05 * i] for i, s in enumerate(steps)], "2": [[s, 0.28 + 0.05 * i] for i, s in enumerate(steps)]},
    }}, "p/bpb": {"random": None, "lower": True, "runs": {
        "good": {"1": [[s, 5 - i] for i, s in enumerate(steps)], "2": [[s, 5 - i] for i, s in enumerate(steps)]},
        "bad": {"1": [[s, 5 - i] for i, s in enumerate(steps)], "2": [[s, 5.0 - i + (0.5 if i == 3 else 0)] for i, s in enumerate(steps)]},
    }}}
    rows = {r["task"]: r for r in ablate.analyze(series, ["good", "bad"])}
    t = rows["t/acc"]
    assert t["monotonicity"] == pytest.approx(1.0)
    assert t["better"] == "good"
    # finals: good 0.60, 0.62 (std .01414); bad 0.45, 0.43 (std .01414) -> separation 0.17 / 0.01414
    assert t["separation"] == pytest.approx(0.17 / (0.02 ** 0.5 / 10 * 1), rel=1e-3)
    assert t["margin_over_random"] == pytest.approx(0.525 - 0.25)
    p = rows["p/bpb"]
    assert p["monotonicity"] == pytest.approx(1.0) and p["better"] == "good" and p["margin_over_random"] is None
    assert [r["task"] for r in ablate.analyze(series, ["good", "bad"])][0] == "t/acc"


def test_lmforge_ablate_end_to_end(tmp_path, tok_dir, capsys):
    clean = write_corpus_jsonl(tmp_path / "clean.jsonl", "gcide", 0, 600)
    rng = random.Random(0)
    rows = [json.loads(l) for l in clean.read_text().splitlines()]
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text("".join(json.dumps({**r, "text": "".join(rng.sample(r["text"], len(r["text"])))}) + "\n" for r in rows))
    (tmp_path / "ab.toml").write_text(f'''
[ablate]
corpora = {{ clean = ["clean.jsonl"], noisy = ["noisy.jsonl"] }}
tokenizer = "{tok_dir}"
out = "ab"
seeds = [1, 2]
tasks = ["perplexity", "dictionary"]
eval_docs = ["clean.jsonl"]
eval_every = 2
limit = 6
docs_per_source = 3
heldout_per_mille = 100
[ablate.pretrain]
max_steps = 4
seq_len = 64
batch_size = 4
checkpoint_every = 2
model = {{ d_model = 32, n_layers = 1, n_heads = 2, n_kv_heads = 2, max_seq_len = 64 }}
''')
    assert main(["ablate", str(tmp_path / "ab.toml")]) == 0
    out = tmp_path / "ab"
    res = json.loads((out / "ablation.json").read_text())
    keys = {r["task"] for r in res["tasks"]}
    assert {"perplexity/bpb", "dictionary/acc", "dictionary/acc_pmi"} <= keys
    for r in res["tasks"]:
        assert r["better"] in ("clean", "noisy") and r["seed_std"] >= 0
    s = res["series"]["perplexity/bpb"]["runs"]
    assert set(s) == {"clean", "noisy"} and all([p[0] for p in v] == [2, 4] for runs in s.values() for v in runs.values())
    assert res["corpora"]["clean"]["excluded_eval_docs"] > 0
    assert (out / "ablation_curves.png").is_file() and (out / "ablation_signal.png").is_file()
    assert "| rank | task/metric" in capsys.readouterr().out
    # the model trained on clean text predicts held-out clean text better than the one trained on shuffled characters
    bpb = next(r for r in res["tasks"] if r["task"] == "perplexity/bpb")
    assert bpb["means"]["clean"] < bpb["means"]["noisy"]
    # a second run reuses everything
    assert main(["ablate", str(tmp_path / "ab.toml")]) == 0


def test_ablate_config_errors(tmp_path):
    (tmp_path / "a.toml").write_text('[ablate]\ncorpora = { a = ["x"] }\ntokenizer = "t"\n')
    with pytest.raises(ConfigError, match="at least two corpora"):
        ablate.load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="seedz"):
        ablate.load_config(tmp_path / "a.toml", ["ablate.seedz=[1]"])
    assert main(["ablate", str(tmp_path / "missing.toml")]) == 2
