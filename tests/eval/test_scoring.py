import math
import random

import numpy as np
import torch

from lmforge.eval import scoring

from .conftest import make_model


def _naive(model, ctx, cont):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont]))
    lp = torch.log_softmax(logits[0].float(), -1)
    L = len(ctx)
    ll = sum(lp[L - 1 + j, cont[j]].item() for j in range(len(cont)))
    greedy = all(lp[L - 1 + j].argmax().item() == cont[j] for j in range(len(cont)))
    return ll, greedy


def test_tree_scores_match_one_forward_per_continuation():
    model = make_model(0, qk_norm=True).eval()
    rng = random.Random(0)
    reqs = [
        scoring.TreeRequest(
            [0] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))],
            [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 8))] for _ in range(rng.randrange(1, 5))],
        )
        for _ in range(30)
    ]
    # a small token budget forces several batches and several requests per packed row
    res = scoring.score_trees(model, reqs, batch_tokens=300)
    assert len(res) == len(reqs)
    for r, out in zip(reqs, res):
        assert len(out) == len(r.continuations)
        for c, (ll, greedy, n) in zip(r.continuations, out):
            ref, g = _naive(model, r.context, c)
            assert abs(ref - ll) < 1e-4
            assert g == greedy and n == len(c)


def test_long_context_is_truncated_from_the_left_keeping_bos():
    model = make_model(0).eval()
    L = model.cfg.max_seq_len
    ctx = [0] + list(range(3, 3 + L + 40))
    cont = [7, 8, 9]
    (ll, _, n), = scoring.score_trees(model, [scoring.TreeRequest(ctx, [cont])])[0:1][0]
    kept = [0] + ctx[len(ctx) - (L - len(cont) - 1):]
    ref, _ = _naive(model, kept, cont)
    assert abs(ll - ref) < 1e-4 and n == 3


def test_token_nll_matches_cross_entropy_over_windows():
    model = make_model(0).eval()
    L = model.cfg.max_seq_len
    doc = [0] + [random.Random(1).randrange(3, 512) for _ in range(L + 50)]
    (nll, n), = scoring.token_nll(model, [doc])
    assert n == len(doc) - 1
    ref = 0.0
    for s in range(0, len(doc) - 1, L):
        w = doc[s : s + L + 1]
        with torch.no_grad():
            logits, _ = model(torch.tensor([w[:-1]]))
        ref += torch.nn.functional.cross_entropy(logits[0], torch.tensor(w[1:]), reduction="sum").item()
    assert abs(nll - ref) < 1e-2


def test_multiple_choice_normalisations_disagree_where_they_should():
    # choice 0 has the best raw log-likelihood, choice 1 the best per character, choice 2 per token
    scores = [(-10.0, False, 2), (-12.0, False, 6), (-11.0, False, 20)]
    choices = [" ab", " abcdefghijklmnopqrstuvwxyz", " abcde"]
    c = scoring.mc_correct(scores, choices, [0])
    assert c == {"acc": 1.0, "acc_norm": 0.0, "acc_tok": 0.0}
    assert scoring.mc_correct(scores, choices, [1])["acc_norm"] == 1.0
    assert scoring.mc_correct(scores, choices, [2])["acc_tok"] == 1.0
    # PMI: the unconditional likelihood of choice 0 is very high, so it loses under PMI
    unc = [(-1.0, False, 10), (-30.0, False, 6), (-20.0, False, 2)]
    assert scoring.mc_correct(scores, choices, [1], unc)["acc_pmi"] == 1.0


def test_exact_match_and_f1():
    assert scoring.exact_match("The Cat.", ["cat"]) == 1.0
    assert scoring.exact_match("a dog", ["cat", "dogs"]) == 0.0
    assert scoring.f1_score("black cat sat", ["the black cat"]) == 0.8
    assert scoring.f1_score("", ["x"]) == 0.0


def test_bootstrap_stderr_is_close_to_binomial():
    v = np.array([1.0] * 30 + [0.0] * 70)
    se = scoring.bootstrap_stderr(v, iters=2000, seed=1)
    assert abs(se - math.sqrt(0.3 * 0.7 / 100)) < 0.006
    assert math.isnan(scoring.bootstrap_stderr([1.0]))


def test_tree_scores_independent_of_row_packing_and_chunking():
    """One request per row, packed rows and a small head chunk give the same scores (the packing
    default only changes speed)."""
    model = make_model(0).eval()
    rng = random.Random(3)
    reqs = [scoring.TreeRequest([0] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 20))],
                                [[rng.randrange(3, 512) for _ in range(rng.randrange(0, 6))] for _ in range(3)])
            for _ in range(25)]
    alone = scoring.score_trees(model, reqs, row_tokens=1)
    packed = scoring.score_trees(model, reqs, row_tokens=400, batch_tokens=800)
    for a, b, r in zip(alone, packed, reqs):
        for (la, ga, na), (lb, gb, nb), c in zip(a, b, r.continuations):
            assert abs(la - lb) < 1e-4 and ga == gb and na == nb == len(c)
            if not c:
                assert (la, ga) == (0.0, True)
    h = torch.randn(40, model.cfg.d_model)
    tt = torch.randint(0, model.cfg.vocab_size, (40,))
    lp, greedy = scoring._target_logprobs(model, h, tt, chunk=7)
    with torch.no_grad():
        ref = torch.log_softmax(model.lm_head(h), -1)
    assert np.allclose(lp, ref.gather(1, tt[:, None]).squeeze(1).numpy(), atol=1e-5)
    assert (greedy == (ref.argmax(-1) == tt).numpy()).all()
