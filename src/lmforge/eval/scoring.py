"""Scoring: log-likelihoods of continuations, multiple-choice metrics, exact match / F1,
bootstrap standard errors, and per-token losses for perplexity.

Multiple-choice scoring packs each example as one *tree*: the context once, then every
continuation after it, all in one row. Positions restart after the context for each
continuation and an attention mask lets a continuation see the context and its own earlier
tokens only, so the context is computed once however many choices there are. Several
examples share a row (a segment id keeps them apart) and rows are padded into one batch, so
a few forwards score hundreds of (context, continuation) pairs. The forward runs the model's
own layers with explicit position ids; only the positions that predict continuation tokens go
through the output head.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.model.transformer import Transformer, plain_linear


@dataclass
class TreeRequest:
    """One context with several continuations (token ids). Scored to one log-likelihood per
    continuation plus whether each continuation is the greedy one."""

    context: list[int]
    continuations: list[list[int]]


def _rope_rows(x: torch.Tensor, cos: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, T, heads, D) with per-row tables cos (B, T, 1, D) and the first half of
    sin (B, T, 1, D/2): out1 = x1 c - x2 s, out2 = x2 c + x1 s (the model's apply_rope, in fewer passes)."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin_h, value=-1.0)
    out[..., h:].addcmul_(x[..., :h], sin_h)
    return out


def _qkv_weight(attn) -> torch.Tensor | None:
    """The three projections' weights concatenated (one GEMM), when they are plain nn.Linear modules."""
    if all(plain_linear(m) for m in (attn.wq, attn.wk, attn.wv)):
        return torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight])
    return None


def _tree_forward(model: Transformer, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                  qkv: list | None = None) -> torch.Tensor:
    """Hidden states after the final norm for rows `ids` (B, T) with explicit positions (B, T)
    and attention mask (B, 1, T, T): boolean, or additive float (0 / -inf). Uses the model's own
    modules; `qkv`: per layer, the concatenated q/k/v weight (`_qkv_weight`) or None."""
    cos = model.rope_cos[pos][:, :, None]  # (B, T, 1, D)
    sin_h = model.rope_sin[pos][:, :, None, : model.rope_sin.shape[-1] // 2]
    x = model.tok_emb(ids)
    B, T, _ = x.shape
    for li, layer in enumerate(model.layers):
        a = layer.attn
        h = layer.attn_norm(x)
        w = qkv[li] if qkv is not None else None
        if w is not None:
            nq, nk = a.wq.weight.shape[0], a.wk.weight.shape[0]
            q, k, v = F.linear(h, w).split([nq, nk, nk], dim=-1)
        else:
            q, k, v = a.wq(h), a.wk(h), a.wv(h)
        q, k, v = (t.view(B, T, -1, a.hd) for t in (q, k, v))
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = _rope_rows(q, cos, sin_h).transpose(1, 2), _rope_rows(k, cos, sin_h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        x = x + a.wo(y.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.norm(x)


def _fit_request(req: TreeRequest, max_len: int) -> TreeRequest:
    """Truncate the context from the left (keeping its first token, the BOS) so that the context
    plus the longest continuation fits the model's context window."""
    longest = max(len(c) for c in req.continuations)
    conts = [c[-(max_len - 1):] for c in req.continuations] if longest >= max_len else req.continuations
    longest = max(len(c) for c in conts)
    ctx = req.context
    if len(ctx) + longest > max_len:
        keep = max(1, max_len - longest)
        ctx = ctx[:1] + ctx[len(ctx) - (keep - 1):] if keep > 1 else ctx[:1]
    return TreeRequest(ctx, conts)


@torch.no_grad()
def score_trees(model: Transformer, requests: list[TreeRequest], batch_tokens: int = 8192, row_tokens: int = 0,
                progress=None) -> list[list[tuple[float, bool, int]]]:
    """Log-likelihood of each continuation given its context.

    Returns, per request, a list of (sum log-prob, is-greedy, n tokens) per continuation.
    `batch_tokens` bounds rows x row length per forward; `row_tokens` bounds one packed row
    (default: 2 x the model's context window).
    """
    model.eval()
    dev = model.tok_emb.weight.device
    max_len = model.cfg.max_seq_len
    fitted = [_fit_request(r, max_len) for r in requests]
    sizes = [len(r.context) + sum(len(c) for c in r.continuations) for r in fitted]
    # Rows are sorted by length, so padding stays small without packing; packing several requests
    # in a row only pays for short ones: attention costs row length per token, masked or not.
    row_cap = row_tokens or max(64, int(np.median(sizes)) if sizes else 0)
    qkv = [_qkv_weight(layer.attn) for layer in model.layers]
    # pack requests into rows (longest first, first fit), then rows into batches
    order = sorted(range(len(fitted)), key=lambda i: -sizes[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        s = sizes[i]
        for r in range(max(0, len(rows) - 16), len(rows)):  # first fit among the newest rows (linear time)
            if room[r] >= s:
                rows[r].append(i)
                room[r] -= s
                break
        else:
            rows.append([i])
            room.append(max(row_cap, s) - s)
    results: list[list[tuple[float, bool, int]] | None] = [None] * len(fitted)
    bi = 0
    while bi < len(rows):
        # rows are roughly sorted by fill; take as many as fit in batch_tokens
        width = max(sum(sizes[i] for i in rows[bi]), 1)
        n = max(1, batch_tokens // width)
        batch = rows[bi : bi + n]
        bi += n
        _score_batch(model, fitted, sizes, batch, dev, results, qkv)
        if progress is not None:
            progress(sum(len(r) for r in batch))
    return results  # type: ignore[return-value]


def _score_batch(model, fitted, sizes, batch, dev, results, qkv=None) -> None:
    T = max(sum(sizes[i] for i in row) for row in batch)
    B = len(batch)
    ids = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)
    br = np.zeros((B, T), dtype=np.int64)
    t_row, t_pred, t_tok, t_pair = [], [], [], []  # per continuation: row, predictor positions, targets, pair index
    pairs: list[tuple[int, int]] = []  # (request, choice)
    for b, row in enumerate(batch):
        t = 0
        for s, i in enumerate(row):
            req = fitted[i]
            L = len(req.context)
            ids[b, t : t + L] = req.context
            pos[b, t : t + L] = np.arange(L)
            seg[b, t : t + L] = s
            last_ctx = t + L - 1
            t += L
            for k, c in enumerate(req.continuations, start=1):
                n = len(c)
                ids[b, t : t + n] = c
                pos[b, t : t + n] = np.arange(L, L + n)
                seg[b, t : t + n] = s
                br[b, t : t + n] = k
                if n:
                    # token j of the continuation is predicted from the context's last token (j = 0) or token j - 1
                    t_pred.append(np.concatenate(([last_ctx], np.arange(t, t + n - 1))))
                    t_tok.append(np.asarray(c, dtype=np.int64))
                    t_row.append(np.full(n, b))
                    t_pair.append(np.full(n, len(pairs)))
                pairs.append((i, k - 1))
                t += n
    segt = torch.from_numpy(seg)
    brt = torch.from_numpy(br)
    post = torch.from_numpy(pos)
    same = (segt[:, :, None] == segt[:, None, :]) & (segt[:, :, None] >= 0)
    branch_ok = (brt[:, None, :] == 0) | (brt[:, :, None] == brt[:, None, :])
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]
    mask = same & branch_ok & causal[None] & (post[:, None, :] <= post[:, :, None])
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding attends to itself (no empty rows)
    dtype = model.tok_emb.weight.dtype
    # one additive mask for every layer (SDPA would convert a boolean one in each call)
    fmask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))[:, None]
    h = _tree_forward(model, torch.from_numpy(ids).to(dev), post.to(dev), fmask.to(dev), qkv)
    sums = np.zeros(len(pairs))
    greedy_all = np.ones(len(pairs), dtype=bool)
    counts = np.zeros(len(pairs), dtype=np.int64)
    if t_tok:
        tb = torch.from_numpy(np.concatenate(t_row)).to(dev)
        tp = torch.from_numpy(np.concatenate(t_pred)).to(dev)
        tt = torch.from_numpy(np.concatenate(t_tok)).to(dev)
        pair = np.concatenate(t_pair)
        lp, greedy = _target_logprobs(model, h[tb, tp], tt)
        sums = np.bincount(pair, weights=lp.astype(np.float64), minlength=len(pairs))
        greedy_all = np.bincount(pair, weights=~greedy, minlength=len(pairs)) == 0
        counts = np.bincount(pair, minlength=len(pairs))
    acc = {p: (float(sums[j]), bool(greedy_all[j]), int(counts[j])) for j, p in enumerate(pairs)}
    for row in batch:
        for i in row:
            results[i] = [acc[(i, k)] for k in range(len(fitted[i].continuations))]


@torch.no_grad()
def _target_logprobs(model, h: torch.Tensor, tt: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """log p(tt[i] | h[i]) and whether tt[i] is greedy (its logit is the row's maximum; an exact tie
    with another token counts as greedy), through the output head in chunks of rows (each chunk's
    logits stay in cache): logit - logsumexp, the max taken once for both."""
    lp = torch.empty(len(tt), dtype=torch.float32, device=h.device)
    greedy = torch.empty(len(tt), dtype=torch.bool, device=h.device)
    for a in range(0, len(tt), chunk):
        logits = model.lm_head(h[a : a + chunk]).float()
        t = tt[a : a + chunk, None]
        target = logits.gather(1, t).squeeze(1)
        mx = logits.amax(dim=-1)
        greedy[a : a + chunk] = target >= mx
        lse = logits.sub_(mx[:, None]).exp_().sum(dim=-1).log_().add_(mx)
        lp[a : a + chunk] = target - lse
    return lp.cpu().numpy(), greedy.cpu().numpy()


@torch.no_grad()
def token_nll(model: Transformer, docs: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) and number of predicted tokens for each document
    (token ids, starting with BOS), in non-overlapping windows of the model's context length."""
    model.eval()
    dev = model.tok_emb.weight.device
    W = model.cfg.max_seq_len
    windows: list[tuple[int, list[int]]] = []  # (doc, tokens incl. the one predicted-from)
    for d, toks in enumerate(docs):
        for start in range(0, max(len(toks) - 1, 0), W):
            windows.append((d, toks[start : start + W + 1]))
    out = [[0.0, 0] for _ in docs]
    windows.sort(key=lambda w: -len(w[1]))
    for s in range(0, len(windows), batch_size):
        chunk = windows[s : s + batch_size]
        L = max(len(w[1]) for w in chunk) - 1
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -100, dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            n = len(w) - 1
            x[r, :n] = torch.tensor(w[:-1])
            y[r, :n] = torch.tensor(w[1:])
        logits, _ = model(x.to(dev))
        nll = F.cross_entropy(logits.float().transpose(1, 2), y.to(dev), ignore_index=-100, reduction="none").sum(1)
        for (d, w), v in zip(chunk, nll.cpu().tolist()):
            out[d][0] += v
            out[d][1] += len(w) - 1
    return [(a, b) for a, b in out]


# ---- metrics -------------------------------------------------------------------------------


def mc_correct(scores: list[tuple[float, bool, int]], choices: list[str], gold: list[int],
               uncond: list[tuple[float, bool, int]] | None = None) -> dict[str, float]:
    """Per-example correctness under each normalisation.

    acc: raw sum log-prob; acc_norm: divided by the continuation's characters (as lm-eval's
    acc_norm, by byte length of the text); acc_tok: divided by its token count; acc_pmi: minus the
    log-prob of the continuation without the context (pointwise mutual information)."""
    ll = np.array([s[0] for s in scores])
    chars = np.array([max(len(c.encode("utf-8")), 1) for c in choices], dtype=float)
    ntok = np.array([max(s[2], 1) for s in scores], dtype=float)
    g = set(gold)
    out = {
        "acc": float(int(np.argmax(ll)) in g),
        "acc_norm": float(int(np.argmax(ll / chars)) in g),
        "acc_tok": float(int(np.argmax(ll / ntok)) in g),
    }
    if uncond is not None:
        out["acc_pmi"] = float(int(np.argmax(ll - np.array([s[0] for s in uncond]))) in g)
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, answers: list[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def f1_score(pred: str, answers: list[str]) -> float:
    """Best token-overlap F1 of the prediction against any reference answer."""
    pt = normalize_answer(pred).split()
    best = 0.0
    for a in answers:
        at = normalize_answer(a).split()
        if not pt or not at:
            best = max(best, float(pt == at))
            continue
        common = sum((Counter(pt) & Counter(at)).values())
        if common:
            p, r = common / len(pt), common / len(at)
            best = max(best, 2 * p * r / (p + r))
    return best


def bootstrap_stderr(values: list[float] | np.ndarray, iters: int = 1000, seed: int = 0, stat=np.mean) -> float:
    """Standard deviation of `stat` over bootstrap resamples of the per-example values."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or iters <= 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(iters, len(v)))
    return float(np.std(stat(v[idx], axis=1), ddof=1))


def bootstrap_ratio_stderr(num: np.ndarray, den: np.ndarray, iters: int = 1000, seed: int = 0, fn=None) -> float:
    """Bootstrap standard error of fn(sum(num)/sum(den)) over resampled items (documents)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if len(num) < 2 or iters <= 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(iters, len(num)))
    r = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    if fn is not None:
        r = fn(r)
    return float(np.std(r, ddof=1))


LN2 = math.log(2)
