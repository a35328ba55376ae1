"""Knowledge distillation (lmforge.posttrain.distill, `lmforge distill`): the chunked KL / CE terms
equal the direct full-logit computation (values and gradients), training lowers the loss, the
output is a normal checkpoint, it resumes, recovery of a pruned model lowers its held-out bits per
byte, a magnitude-pruned student keeps its zeros, and bad input is one line."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import ConfigError, InputError
from lmforge.infer import compress as C
from lmforge.infer import load_model, load_model_and_tokenizer
from lmforge.infer.compress_commands import lowrank_checkpoint, prune_checkpoint
from lmforge.model import Transformer, preset
from lmforge.posttrain.distill import DistillConfig, distill_objective, kd_terms, run_distill
from lmforge.train.checkpoint import save_checkpoint
from tests.conftest import SAMPLE
from tests.eval.conftest import train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(teacher checkpoint, training text .jsonl): a tiny model briefly trained on dictionary text,
    so it is a better model of held-out text than a random one."""
    root = tmp_path_factory.mktemp("kd")
    tok_dir = train_tokenizer(root / "tok")
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_dir / "tokenizer.json")
    rows = [json.loads(line) for line in gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt")][:400]
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=512, max_seq_len=64, d_model=64, n_layers=2))
    ids = [t for r in rows for t in [tok.bos_id] + tok.encode(r["text"])]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data_t = torch.tensor(ids)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        rows_t = torch.stack([data_t[s : s + 65] for s in starts])
        _, loss = m(rows_t[:, :-1], rows_t[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(root / "ck", 60, sd, m.cfg.to_dict(), [], {"data": {}}, tokenizer_file=tok_dir / "tokenizer.json")
    return root / "ck" / "step_000060", data


def _cfg(**kw) -> DistillConfig:
    base = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, optimizer="adamw", warmup_steps=0, checkpoint_every=0,
                eval_every=0, log_every=1, heldout_sequences=4, schedule="constant")
    cfg = DistillConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]


# ---- the loss math ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [5, 1024])
def test_kd_terms_equal_the_direct_computation(chunk):
    torch.manual_seed(0)
    V, d, N = 50, 8, 23
    s_head, t_head = torch.nn.Linear(d, V, bias=False), torch.nn.Linear(12, V, bias=False)
    sh = torch.randn(N, d, requires_grad=True)
    th = torch.randn(N, 12)
    y = torch.randint(0, V, (N,))
    y[[2, 7, 19]] = -100
    Tm, alpha = 2.5, 0.3
    kl, ce = kd_terms(sh, th, y, s_head, t_head, Tm, chunk)
    loss = distill_objective(kl, ce, Tm, alpha)
    loss.backward()
    g_chunked, gw_chunked = sh.grad.clone(), s_head.weight.grad.clone()

    sh.grad, s_head.weight.grad = None, None
    valid = y != -100
    zs, zt = s_head(sh)[valid], t_head(th)[valid]
    kl_ref = F.kl_div((zs / Tm).log_softmax(-1), (zt / Tm).log_softmax(-1), log_target=True, reduction="batchmean")
    ce_ref = F.cross_entropy(zs, y[valid])
    ref = alpha * Tm**2 * kl_ref + (1 - alpha) * ce_ref
    ref.backward()
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, sh.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_chunked, s_head.weight.grad, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_for_the_teacher_itself():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(10, 8)
    with torch.no_grad():
        kl, ce = kd_terms(h, h, torch.randint(0, 30, (10,)), head, head, 1.7, 4)
    assert abs(kl.item()) < 1e-6 and ce.item() > 0


# ---- training ------------------------------------------------------------------------------------------


def test_fresh_student_learns_and_is_a_normal_checkpoint(setup, tmp_path):
    teacher, data = setup
    out = tmp_path / "kd"
    res = run_distill(_cfg(), teacher, out, student_preset="tiny",
                      student_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}, data=[data])
    losses = _losses(out)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert res.student_bpb < res.student_bpb_before and res.student_params < res.teacher_params
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and "ce" in r for r in recs if r.get("kind") == "train")
    model, tok, ref = load_model_and_tokenizer(out)  # through `latest`
    assert ref.path == res.checkpoint and model.cfg.d_model == 32
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert state["stage"] == "distill" and state["distill"] == {"temperature": 2.0, "alpha": 0.5}
    assert (res.checkpoint / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()


def test_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    teacher, data = setup
    kw = dict(student_preset="tiny", student_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
              data=[data])
    straight = run_distill(_cfg(max_steps=6), teacher, tmp_path / "a", **kw)
    run_distill(_cfg(max_steps=3, checkpoint_every=3), teacher, tmp_path / "b", **kw)
    resumed = run_distill(_cfg(max_steps=6, checkpoint_every=3), teacher, tmp_path / "b", **kw)
    assert resumed.resumed_from == 3
    a, _ = load_model(straight.checkpoint)
    b, _ = load_model(resumed.checkpoint)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_recovery_of_a_pruned_model_lowers_its_heldout_bpb(setup, tmp_path):
    teacher, data = setup
    pruned = tmp_path / "mlp"
    r = prune_checkpoint(teacher, pruned, "mlp", keep_ratio=0.25)
    assert r["bpb_change"] > 0
    res = run_distill(_cfg(max_steps=15, heldout_sequences=8), teacher, tmp_path / "rec", student=pruned, data=[data])
    assert res.student_bpb_before == pytest.approx(r["compressed"]["bpb"], rel=1e-4)
    assert res.student_bpb < res.student_bpb_before
    m, _ = load_model(res.checkpoint)
    assert m.cfg.ffn_hidden == 48
    assert json.loads((res.checkpoint / "state.json").read_text())["compression"]["method"] == "mlp"


def test_magnitude_pruned_student_keeps_its_zeros(setup, tmp_path):
    teacher, data = setup
    pruned = tmp_path / "mag"
    prune_checkpoint(teacher, pruned, "magnitude", sparsity=0.5)
    before, _ = load_model(pruned)
    res = run_distill(_cfg(max_steps=4), teacher, tmp_path / "rec", student=pruned, data=[data])
    after, _ = load_model(res.checkpoint)
    for name, lin in C.block_linears(before):
        w0, w1 = lin.weight, after.get_submodule(name).weight
        assert torch.equal(w0 == 0, w1 == 0), name  # the same zeros ...
    assert not torch.equal(before.layers[0].mlp.w1.weight, after.layers[0].mlp.w1.weight)  # ... and trained weights


def test_lowrank_student_stays_lowrank(setup, tmp_path):
    teacher, data = setup
    lr = tmp_path / "lr"
    lowrank_checkpoint(teacher, lr, 0.5)
    res = run_distill(_cfg(max_steps=3), teacher, tmp_path / "rec", student=lr, data=[data])
    m, _ = load_model(res.checkpoint)
    assert C.lowrank_map(m) == json.loads((lr / "state.json").read_text())["lowrank"]["ranks"]


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_input(setup, tmp_path, capsys):
    teacher, data = setup
    with pytest.raises(ConfigError):
        _cfg(temperature=0)
    with pytest.raises(ConfigError):
        _cfg(alpha=1.5)
    with pytest.raises(ConfigError, match="one of them"):
        run_distill(_cfg(), teacher, tmp_path / "x")
    with pytest.raises(InputError, match="no such file"):
        run_distill(_cfg(), teacher, tmp_path / "x", student_preset="tiny", data=[tmp_path / "missing.jsonl"])
    other = train_tokenizer(tmp_path / "tok2", vocab=300)
    torch.manual_seed(1)
    m = Transformer(preset("tiny", vocab_size=512, max_seq_len=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1))
    save_checkpoint(tmp_path / "s", 1, {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}, m.cfg.to_dict(),
                    [], {"data": {}}, tokenizer_file=other / "tokenizer.json")
    with pytest.raises(InputError, match="share a tokenizer"):
        run_distill(_cfg(), teacher, tmp_path / "x", student=tmp_path / "s" / "step_000001", data=[data])
    cases = [["distill", str(teacher), "--out", str(tmp_path / "y")],
             ["distill", str(teacher), "--out", str(tmp_path / "y"), "--student-preset", "huge"],
             ["distill", str(teacher), "--out", str(tmp_path / "y"), "--student-preset", "tiny", "--student-set", "colour=3"],
             ["distill", str(teacher), "--out", str(tmp_path / "y"), "--student-preset", "tiny", "--temperature", "-1"],
             ["distill", str(teacher), "--out", str(tmp_path / "y"), "--student-preset", "tiny", "--tokens", str(tmp_path)]]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) != 0, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmforge: error:") and "\n" not in err and "Traceback" not in err, (argv, err)


def test_cli_distill_runs(setup, tmp_path, capsys):
    teacher, data = setup
    assert main(["distill", str(teacher), "--student-preset", "tiny", "--student-set", "d_model=32",
                 "--student-set", "n_layers=1", "--student-set", "n_heads=2", "--student-set", "n_kv_heads=1",
                 "--out", str(tmp_path / "c"), "--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                 "--temperature", "1.5", "--alpha", "0.8", "--distill.eval_every", "0"]) == 0
    out = capsys.readouterr().out
    assert "held-out bits/byte" in out and "3 steps" in out
    state = json.loads(((tmp_path / "c") / "step_000003" / "state.json").read_text())
    assert state["distill"] == {"temperature": 1.5, "alpha": 0.8}


def test_student_init_from_teacher_layers():
    from lmforge.posttrain.distill import build_student, init_from_teacher, teacher_layers

    assert teacher_layers(4, 2) == [0, 3] and teacher_layers(4, 1) == [3] and teacher_layers(6, 3) == [0, 2, 5]
    torch.manual_seed(0)
    teacher = Transformer(preset("tiny", vocab_size=512, max_seq_len=64, d_model=64, n_layers=2))
    student = build_student("tiny", teacher.cfg, {"d_model": 64, "n_layers": 1}, 0, "cpu")
    assert init_from_teacher(student, teacher) == [1]
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    for (k, v), w in zip(student.layers[0].state_dict().items(), teacher.layers[1].state_dict().values()):
        assert torch.equal(v, w), k
    narrow = build_student("tiny", teacher.cfg, {"d_model": 32, "n_layers": 1}, 0, "cpu")
    with pytest.raises(ConfigError, match="d_model"):
        init_from_teacher(narrow, teacher)
