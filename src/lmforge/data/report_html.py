"""A static HTML inspection report of a data run: one self-contained file (plots embedded as
base64 PNG) to open in a browser.

`write_inspection_html(corpus_dir, out_path)` reads what the data stage left in `corpus/`:
- `stats.json`: per-step counts (docs in/out, drops per reason, time), totals, top domains;
- `removed/*.jsonl`: samples of removed documents per step and reason;
- the shards: documents per source, top domains with sample documents, and tokenizer-free
  length histograms (characters and words per document);
- `topics/topics.json` + `topics/topic_map.png` when `lmforge data topics` was run.
Everything is escaped; a missing piece is reported as missing, not an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from lmforge.data.corpus_io import iter_shard, list_shards
from lmforge.errors import InputError
from lmforge.log import log_once, progress
from lmforge.rundir import atomic_write_text, read_json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.3em 0}summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;background:#fafafa;border:1px solid #eee;padding:.5em;font-size:.85em;max-height:18em;overflow:auto}
.muted{color:#777}img{max-width:100%}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _domain(meta: dict) -> str:
    d = meta.get("domain")
    if d:
        return str(d)
    url = meta.get("url")
    if url:
        try:
            return urlsplit(str(url)).hostname or "(no host)"
        except ValueError:
            return "(bad url)"
    return f"(source: {meta.get('source', 'unknown')})"


def _steps(stats) -> list[dict]:
    if isinstance(stats, list):
        return [s for s in stats if isinstance(s, dict) and "name" in s]
    if isinstance(stats, dict):
        for key in ("steps", "pipeline"):
            if isinstance(stats.get(key), list):
                return [s for s in stats[key] if isinstance(s, dict) and "name" in s]
    return []


def _top_domains(stats) -> list[tuple[str, int]]:
    td = stats.get("top_domains") if isinstance(stats, dict) else None
    out = []
    if isinstance(td, dict):
        out = [(str(k), int(v)) for k, v in td.items() if isinstance(v, (int, float))]
    elif isinstance(td, list):
        for item in td:
            if isinstance(item, (list, tuple)) and len(item) >= 2:
                out.append((str(item[0]), int(item[1])))
            elif isinstance(item, dict):
                name = item.get("domain") or item.get("name")
                n = item.get("docs", item.get("count", 0))
                if name:
                    out.append((str(name), int(n)))
    return sorted(out, key=lambda t: -t[1])


def read_removed(removed_dir: Path, per_reason: int = 5) -> dict[str, dict[str, list[dict]]]:
    """step -> reason -> sample records, from removed/*.jsonl (corrupt lines are skipped)."""
    out: dict[str, dict[str, list[dict]]] = {}
    if not removed_dir.is_dir():
        return out
    for p in sorted(removed_dir.glob("*.jsonl")):
        step = p.stem
        by_reason: dict[str, list[dict]] = defaultdict(list)
        with open(p, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                except (ValueError, KeyError, TypeError):
                    log_once(f"removed:{p}", f"{p}:{lineno}: unreadable removed-sample record, skipped")
                    continue
                meta = rec.get("metadata") or {}
                reason = str(rec.get("reason") or meta.get("reason") or meta.get("drop_reason") or "removed")
                if len(by_reason[reason]) < per_reason:
                    by_reason[reason].append({"id": rec.get("id", "?"), "text": text, "metadata": meta})
        out[step] = dict(by_reason)
    return out


def scan_shards(corpus_dir: Path, max_docs: int = 200_000, per_domain: int = 2) -> dict:
    """One pass over the shards: per-source counts, domains with sample documents, lengths."""
    chars, nwords = [], []
    sources: Counter = Counter()
    domains: Counter = Counter()
    samples: dict[str, list[dict]] = defaultdict(list)
    n = 0
    truncated = False
    for shard in progress(list_shards(corpus_dir), desc="inspecting", unit="shard"):
        for d in iter_shard(shard):
            if n >= max_docs:
                truncated = True
                break
            n += 1
            chars.append(len(d.text))
            nwords.append(len(d.text.split()))
            sources[str(d.metadata.get("source", "unknown"))] += 1
            dom = _domain(d.metadata)
            domains[dom] += 1
            if len(samples[dom]) < per_domain:
                samples[dom].append({"id": d.id, "text": d.text[:400], "url": d.metadata.get("url", "")})
        if truncated:
            break
    return {"docs": n, "truncated": truncated, "chars": np.array(chars), "words": np.array(nwords),
            "sources": sources, "domains": domains, "samples": samples, "shards": len(list_shards(corpus_dir))}


def length_histograms(chars: np.ndarray, words: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, arr, label in ((axes[0], chars, "characters"), (axes[1], words, "words")):
        arr = arr[arr > 0]
        if len(arr):
            bins = np.logspace(0, np.log10(max(arr.max(), 10)), 40)
            ax.hist(arr, bins=bins, color="#4c72b0")
            ax.set_xscale("log")
            ax.axvline(np.median(arr), color="#c44e52", ls="--", label=f"median {np.median(arr):,.0f}")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{label} per document (log scale)")
        ax.set_ylabel("documents")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    h = "".join(f"<th>{_e(x)}</th>" for x in headers)
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Already-escaped HTML inside a table cell."""


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else (f"{n:,.2f}" if isinstance(n, float) else str(n))


def write_inspection_html(corpus_dir: str | Path, out_path: str | Path, max_docs: int = 200_000, samples_per_reason: int = 5) -> Path:
    """Write the inspection report of `corpus_dir` (a corpus/ directory or a run directory) to `out_path`."""
    cdir = Path(corpus_dir)
    if (cdir / "corpus").is_dir():
        cdir = cdir / "corpus"
    if not cdir.is_dir():
        raise InputError(f"corpus not found: {corpus_dir}")
    stats = read_json(cdir / "stats.json", {}) or {}
    steps = _steps(stats)
    removed = read_removed(cdir / "removed", samples_per_reason)
    scan = scan_shards(cdir, max_docs)
    if not steps and not scan["docs"] and not removed:
        raise InputError(f"{cdir}: nothing to inspect (no stats.json, no removed samples, no shards)")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge inspection: {_e(cdir)}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>Data inspection</h1><p class='muted'>{_e(cdir.resolve())}</p>")
    nav = ["steps", "removed", "sources", "domains", "lengths", "topics"]
    parts.append("<p>" + " · ".join(f"<a href='#{s}'>{s}</a>" for s in nav) + "</p>")

    # summary
    total_chars = int(scan["chars"].sum()) if scan["docs"] else 0
    summary = [["shards", _fmt(scan["shards"])], ["documents", _fmt(scan["docs"]) + (" (scan stopped at max_docs)" if scan["truncated"] else "")],
               ["characters", _fmt(total_chars)]]
    if isinstance(stats, dict):
        for k, v in (stats.get("totals") or {}).items():
            if isinstance(v, (int, float, str)):
                summary.append([f"totals.{k}", _fmt(v)])
    parts.append("<h2>Summary</h2>" + _table(["", "value"], summary))

    # per-step counts
    parts.append("<h2 id='steps'>Pipeline steps</h2>")
    if steps:
        rows = []
        for s in steps:
            din, dout = int(s.get("docs_in", 0)), int(s.get("docs_out", 0))
            dropped = s.get("dropped") or {}
            reasons = ", ".join(f"{_e(r)}: {_fmt(int(n))}" for r, n in sorted(dropped.items(), key=lambda t: -t[1]))
            kept = ", ".join(f"{_e(r)}: {_fmt(int(n))}" for r, n in (s.get("counters") or {}).items() if isinstance(n, (int, float)))
            share = f"{(din - dout) / din:.1%}" if din else "-"
            rows.append([s["name"], _fmt(din), _fmt(dout), share, _Raw(reasons or "-"), _Raw(kept or "-"), f"{float(s.get('time_s', 0)):.1f}"])
        parts.append(_table(["step", "docs in", "docs out", "removed", "drops by reason", "counters", "time (s)"], rows, {1, 2, 3, 6}))
    else:
        parts.append("<p class='muted'>no stats.json (or no steps in it)</p>")

    # removed samples
    parts.append("<h2 id='removed'>Removed samples</h2>")
    if removed:
        for step, by_reason in removed.items():
            parts.append(f"<h3>{_e(step)}</h3>")
            for reason, recs in by_reason.items():
                items = "".join(
                    f"<p class='muted'>{_e(r['id'])} {_e(json.dumps({k: v for k, v in r['metadata'].items() if k != 'text'}, ensure_ascii=False, default=str)[:300])}</p><pre>{_e(r['text'][:1500])}</pre>"
                    for r in recs
                )
                parts.append(f"<details><summary>{_e(reason)} ({len(recs)} shown)</summary>{items}</details>")
    else:
        parts.append("<p class='muted'>no removed/*.jsonl samples</p>")

    # sources
    parts.append("<h2 id='sources'>Documents per source</h2>")
    parts.append(_table(["source", "documents", "share"], [[s, _fmt(n), f"{n / max(scan['docs'], 1):.1%}"] for s, n in scan["sources"].most_common()], {1, 2}))

    # domains
    parts.append("<h2 id='domains'>Top domains</h2>")
    counted = scan["domains"].most_common(25)
    from_stats = _top_domains(stats)
    if from_stats:
        parts.append("<p class='muted'>From stats.json (whole pipeline input): " + ", ".join(f"{_e(d)} ({_fmt(n)})" for d, n in from_stats[:15]) + "</p>")
    for dom, n in counted:
        ex = "".join(f"<p class='muted'>{_e(s['id'])} {_e(s['url'])}</p><pre>{_e(s['text'])}</pre>" for s in scan["samples"].get(dom, []))
        parts.append(f"<details><summary>{_e(dom)}: {_fmt(n)} documents</summary>{ex}</details>")

    # lengths
    parts.append("<h2 id='lengths'>Document lengths</h2>")
    if scan["docs"]:
        c, w = scan["chars"], scan["words"]
        q = lambda a: ", ".join(f"p{p} {np.percentile(a, p):,.0f}" for p in (10, 50, 90, 99))  # noqa: E731
        parts.append(f"<p>characters: {q(c)}<br>words: {q(w)}</p>")
        parts.append(f"<img alt='length histograms' src='data:image/png;base64,{length_histograms(c, w)}'>")
    else:
        parts.append("<p class='muted'>no documents in the shards</p>")

    # topics
    parts.append("<h2 id='topics'>Topics</h2>")
    topics = read_json(cdir / "topics" / "topics.json")
    if topics:
        png = cdir / "topics" / topics.get("map", "topic_map.png")
        if png.is_file():
            parts.append(f"<img alt='topic map' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')}'>")
        rows = []
        for cl in topics.get("clusters", []):
            ex = "".join(f"<pre>{_e(x['text'][:300])}</pre>" for x in cl.get("examples", [])[:2])
            rows.append([cl.get("id"), _fmt(int(cl.get("size", 0))), f"{float(cl.get('share', 0)):.1%}", ", ".join(cl.get("terms", [])),
                         _Raw(f"<details><summary>examples</summary>{ex}</details>")])
        parts.append(f"<p>{_fmt(int(topics.get('sample', 0)))} sampled documents, k = {_e(topics.get('k'))}</p>")
        parts.append(_table(["id", "size", "share", "top terms", "examples"], rows, {1, 2}))
    else:
        parts.append("<p class='muted'>not computed (run <code>lmforge data topics RUN</code>)</p>")
    parts.append("</body></html>\n")
    return atomic_write_text(out_path, "\n".join(parts))
