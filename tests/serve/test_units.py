"""Pieces of the server on their own: the scorer shares the model's weights and never its KV cache;
stream text never leaks a stop string."""

import torch

from lmforge.model import Transformer, preset
from lmforge.serve.app import Scorer, _Stream
from lmforge.serve.protocol import stop_holdback


def test_scorer_shares_weights_has_no_cache_and_scores_like_the_model():
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=64, max_seq_len=32, d_model=32, n_layers=2)).eval()
    m.setup_cache(2, 16)  # an engine's cache installed on the served model
    s = Scorer(m)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(m.parameters(), s.model.parameters()))
    assert all(l.attn.cache is None for l in s.model.layers) and all(l.attn.cache is not None for l in m.layers)
    ids = [1, 5, 9, 3, 7]
    lps, tops = s.score(ids, 2)
    m.clear_cache()
    with torch.no_grad():
        want = m(torch.tensor([ids]))[0][0, :-1].log_softmax(-1)
    assert lps[0] is None and tops[0] is None
    for i in range(1, len(ids)):
        assert abs(lps[i] - want[i - 1, ids[i]].item()) < 1e-5
        assert tops[i][0][0] == int(want[i - 1].argmax()) and len(tops[i]) == 2


def test_stream_text_holds_back_possible_stop_strings():
    assert stop_holdback("hello wor", ["world"]) == 3 and stop_holdback("hello", ["xyz"]) == 0
    st = _Stream(["END"])
    out = [st.push(d) for d in ("ab", "cE", "N", "x", "yE", "ND", "tail")]
    assert "".join(out) == "abcENxy"  # "EN" released once "x" shows it was no stop; nothing from "END" on
    assert st.finish("abcENxy") == ""
    st = _Stream([])
    assert st.push("héllo") == "héllo" and st.finish("héllo wörld") == " wörld"
