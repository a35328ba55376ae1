"""Inspecting a trained tokenizer: compression per source, longest and least frequent tokens.

`tokenizer_stats` turns per-source (docs, bytes, tokens) figures and per-id corpus counts
into the dict written to tokenizer/stats.json; `stats_markdown` renders the report section
and `plot_stats` a PNG (bytes/token per source, rank-frequency of the vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.tokenizer.runtime import Tokenizer


def show_token(tok: Tokenizer, i: int) -> str:
    """A token as readable text: its bytes decoded (lossy), whitespace made visible."""
    b = tok.token_bytes(i)
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character: show the bytes
        s = "".join(f"<0x{c:02X}>" if c >= 0x80 else chr(c) for c in b)
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣")


def vocab_profile(tok: Tokenizer) -> dict:
    """How the vocabulary is spent: whitespace runs, digits, leading-space words, non-ASCII."""
    special = set(tok.special_tokens.values())
    prof = {"whitespace_runs": 0, "longest_space_run": 0, "digit_tokens": 0, "leading_space_words": 0, "non_ascii": 0}
    for i in range(tok.vocab_size):
        if i in special:
            continue
        try:
            b = tok.token_bytes(i)
        except KeyError:
            continue
        if b and b.isspace() and len(b) > 1:
            prof["whitespace_runs"] += 1
            if set(b) == {0x20}:
                prof["longest_space_run"] = max(prof["longest_space_run"], len(b))
        if b.isdigit():
            prof["digit_tokens"] += 1
        if len(b) > 1 and b[:1] == b" " and b[1:].isalpha():
            prof["leading_space_words"] += 1
        if any(c >= 0x80 for c in b):
            prof["non_ascii"] += 1
    return prof


def tokenizer_stats(tok: Tokenizer, sources: dict[str, dict], counts: np.ndarray | None, top: int = 20, basis: str = "corpus") -> dict:
    """stats.json: bytes/token per source, longest tokens, last learned merges, least (and most) frequent tokens."""
    special = set(tok.special_tokens.values())
    normal = [i for i in range(tok.vocab_size) if i not in special]
    lengths = {i: len(tok.token_bytes(i)) for i in normal}
    longest = sorted(normal, key=lambda i: (-lengths[i], i))[:top]
    nb = sum(s["bytes"] for s in sources.values())
    nt = sum(s["tokens"] for s in sources.values())
    out: dict = {
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "pattern": tok.pattern,
        "basis": basis,  # "corpus": figures over the whole encoded corpus; "sample": over the training sample
        "bytes_per_token": round(nb / max(nt, 1), 4),
        "sources": {k: dict(v, bytes_per_token=round(v["bytes"] / max(v["tokens"], 1), 4)) for k, v in sorted(sources.items())},
        "mean_token_bytes": round(float(np.mean(list(lengths.values()))), 3) if lengths else 0.0,
        "longest_tokens": [{"id": i, "bytes": lengths[i], "text": show_token(tok, i)} for i in longest],
        # the last merges BPE learned: the least frequent pairs of the training sample, where odd data shows first
        "last_learned_tokens": [{"id": i, "text": show_token(tok, i)} for i in sorted(normal, reverse=True)[:top]],
        "profile": vocab_profile(tok),
    }
    if counts is not None:
        c = np.asarray(counts)[: tok.vocab_size]
        ids = np.array(normal)
        learned = np.array([i for i in normal if lengths[i] > 1])  # merges; single bytes are listed as a count
        order = learned[np.lexsort((learned, c[learned]))] if len(learned) else learned  # ascending count, then id
        out["unused_tokens"] = int((c[ids] == 0).sum())
        out["unused_byte_tokens"] = int(sum(1 for i in normal if lengths[i] == 1 and c[i] == 0))
        out["least_frequent_tokens"] = [{"id": int(i), "count": int(c[i]), "text": show_token(tok, int(i))} for i in order[:top]]
        by_count = ids[np.lexsort((ids, -c[ids]))]
        out["most_frequent_tokens"] = [{"id": int(i), "count": int(c[i]), "text": show_token(tok, int(i))} for i in by_count[:top]]
    return out


def _cell(s: str) -> str:
    return "`" + s.replace("|", "\\|").replace("`", "'") + "`"


def stats_markdown(stats: dict, plot: str | None = None) -> str:
    lines = [
        f"Vocabulary: **{stats['vocab_size']}** ids ({len(stats['special_tokens'])} special); "
        f"**{stats['bytes_per_token']:.3f} bytes/token** overall ({stats['basis']}); mean token length {stats['mean_token_bytes']} bytes.",
        "",
        "| source | docs | MB | tokens | bytes/token |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in stats["sources"].items():
        lines.append(f"| {k} | {v['docs']:,} | {v['bytes'] / 1e6:.2f} | {v['tokens']:,} | {v['bytes_per_token']:.3f} |")
    p = stats["profile"]
    lines += ["", f"Vocabulary profile: {p['whitespace_runs']} whitespace-run tokens (longest run of spaces: {p['longest_space_run']}), "
              f"{p['digit_tokens']} digit tokens, {p['leading_space_words']} ' word' tokens, {p['non_ascii']} tokens with non-ASCII bytes."]
    if plot:
        lines += ["", f"![tokenizer]({plot})"]
    lines += ["", "Longest tokens: " + ", ".join(f"{_cell(t['text'])} ({t['bytes']})" for t in stats["longest_tokens"])]
    lines += ["", "Last learned tokens (rarest merges of the training sample): "
              + ", ".join(_cell(t["text"]) for t in stats.get("last_learned_tokens", []))]
    if "least_frequent_tokens" in stats:
        lines += ["", f"{stats['unused_tokens']} ids never used in the {stats['basis']} ({stats['unused_byte_tokens']} of them single bytes). "
                  "Least frequent learned tokens: "
                  + ", ".join(f"{_cell(t['text'])} ({t['count']})" for t in stats["least_frequent_tokens"])]
        lines += ["", "Most frequent tokens: " + ", ".join(f"{_cell(t['text'])} ({t['count']:,})" for t in stats["most_frequent_tokens"][:10])]
    return "\n".join(lines) + "\n"


def plot_stats(stats: dict, counts: np.ndarray | None, path: str | Path) -> Path:
    """PNG: bytes/token per source (bar) and the rank-frequency curve of token ids (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.rundir import atomic_write_bytes

    fig, axes = plt.subplots(1, 2 if counts is not None else 1, figsize=(10 if counts is not None else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    names = list(stats["sources"])
    ax.bar(names, [stats["sources"][n]["bytes_per_token"] for n in names], color="#4c72b0")
    ax.set_ylabel("bytes / token")
    ax.set_title("compression per source")
    ax.tick_params(axis="x", rotation=30)
    if counts is not None:
        c = np.sort(np.asarray(counts))[::-1]
        c = c[c > 0]
        ax2 = axes[0][1]
        ax2.loglog(np.arange(1, len(c) + 1), c, color="#dd8452")
        ax2.set_xlabel("rank")
        ax2.set_ylabel("count")
        ax2.set_title(f"token frequency ({stats.get('unused_tokens', 0)} ids unused)")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def sample_compression(tok: Tokenizer, texts: list[str], sources: list[str]) -> tuple[dict[str, dict], np.ndarray]:
    """Per-source figures and id counts over a list of texts (used when the corpus is not encoded)."""
    out: dict[str, dict] = {}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(0, len(texts), 1024):
        batch = texts[i:i + 1024]
        ids = tok.encode_batch(batch)
        for t, s, x in zip(batch, sources[i:i + 1024], ids):
            d = out.setdefault(s, {"docs": 0, "bytes": 0, "tokens": 0})
            d["docs"] += 1
            d["bytes"] += len(t.encode("utf-8"))
            d["tokens"] += len(x)
        flat = np.fromiter((j for x in ids for j in x), dtype=np.int64)
        counts += np.bincount(flat, minlength=tok.vocab_size)[: tok.vocab_size]
    return out, counts
