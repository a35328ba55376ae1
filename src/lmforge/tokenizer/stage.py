"""The tokenizer stage: train the BPE on a corpus sample, encode the corpus, write stats + report.

Reads `corpus/*.jsonl.zst` (or `tokenizer.corpus`), writes `tokenizer/` (tokenizer.json,
special_tokens.json, stats.json, tokenizer.png, report.md) and `tokens/` (see
docs/ARTIFACTS.md). A killed run resumes: a tokenizer trained under the same stage
fingerprint is reused, and corpus shards already encoded are not encoded again.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.recipe import StageContext, StageResult
from lmforge.rundir import atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer.config import TokenizerConfig
from lmforge.tokenizer.corpus import corpus_shards


def build_tokenizer(
    corpus_dir: Path,
    out: Path,
    tokens_dir: Path | None,
    cfg: TokenizerConfig,
    seed: int,
    workers: int,
    fingerprint: str = "",
) -> tuple[dict, dict]:
    """Train (or reuse) the tokenizer in `out`; encode into `tokens_dir` when given. Returns (stats, index)."""
    from lmforge.log import logger
    from lmforge.tokenizer.encode import encode_corpus
    from lmforge.tokenizer.runtime import load_tokenizer
    from lmforge.tokenizer.inspect import plot_stats, sample_compression, stats_markdown, tokenizer_stats
    from lmforge.tokenizer.train_bpe import train_from_corpus

    shards = corpus_shards(corpus_dir)
    marker = out / ".work" / "trained.json"
    t0 = time.time()
    sample = None
    m = read_json(marker)
    if fingerprint and m and m.get("fingerprint") == fingerprint and (out / "tokenizer.json").exists():
        logger.info("tokenizer: reusing %s (trained under the same fingerprint)", out / "tokenizer.json")
        train_info = m["train"]
    else:
        _, sample = train_from_corpus(shards, out, cfg, seed)
        dt = time.time() - t0
        train_info = {"docs": len(sample.texts), "bytes": sample.bytes, "seconds": round(dt, 3),
                      "mb_per_s": round(sample.bytes / 1e6 / max(dt, 1e-9), 3), "docs_seen": sample.docs_seen,
                      "corrupt_records": sample.corrupt, "sources": sample.by_source}
        atomic_write_json(marker, {"fingerprint": fingerprint, "train": train_info})
    tok = load_tokenizer(out)

    index: dict = {}
    if tokens_dir is not None:
        index = encode_corpus(shards, out, tokens_dir, out / ".work" / "encode", val_fraction=cfg.val_fraction,
                              shard_tokens=cfg.shard_tokens, dtype=cfg.token_dtype(), seed=seed, workers=workers,
                              batch_docs=cfg.batch_docs)
        counts = index.pop("counts")
        sources = {k: {kk: v[kk] for kk in ("docs", "bytes", "tokens")} for k, v in index["sources"].items()}
        stats = tokenizer_stats(tok, sources, counts, cfg.inspect_top, basis="corpus")
    else:
        if sample is None:
            from lmforge.tokenizer.train_bpe import sample_corpus

            sample = sample_corpus(shards, cfg.train_bytes, cfg.max_doc_chars, seed)
        sources, counts = sample_compression(tok, sample.texts, sample.sources)
        stats = tokenizer_stats(tok, sources, counts, cfg.inspect_top, basis="sample")
    stats["training"] = train_info
    if index:
        stats["encoding"] = {"seconds": index["encode_seconds"], "mb_per_s": index["encode_mb_per_s"], **index["totals"]}
    plot_stats(stats, counts, out / "tokenizer.png")
    atomic_write_json(out / "stats.json", stats)
    atomic_write_text(out / "report.md", stats_markdown(stats, plot="tokenizer.png"))  # the recipe runner replaces it with the stage section
    return stats, index


def run_stage(ctx: StageContext) -> StageResult:
    cfg: TokenizerConfig = ctx.cfg
    corpus_dir = ctx.resolve(cfg.corpus) if cfg.corpus else ctx.run_dir.corpus
    tokens_dir = ctx.run_dir.tokens if cfg.encode else None
    stats, index = build_tokenizer(corpus_dir, ctx.out, tokens_dir, cfg, ctx.seed, ctx.workers, ctx.fingerprint)
    from lmforge.tokenizer.inspect import stats_markdown

    rel_plot = f"{ctx.out.name}/tokenizer.png"
    tr = stats["training"]
    lines = [f"Byte-level BPE trained on {tr['docs']:,} documents ({tr['bytes'] / 1e6:.1f} MB sampled across the corpus) "
             f"at {tr['mb_per_s']:.2f} MB/s; pre-tokenizer digits = `{cfg.digits}`."]
    counts = {"vocab_size": stats["vocab_size"], "bytes_per_token": stats["bytes_per_token"], "train_mb_per_s": tr["mb_per_s"]}
    if index:
        t = index["totals"]
        lines.append(f"Encoded {t['docs']:,} documents ({t['bytes'] / 1e6:.1f} MB) at {index['encode_mb_per_s']:.2f} MB/s into "
                     f"{t['train_tokens']:,} train tokens ({len(index['train'])} shards) and {t['val_tokens']:,} val tokens "
                     f"({t['val_docs']} docs), {index['dtype']}; {t['corrupt_records']} corrupt records skipped.")
        counts.update(train_tokens=t["train_tokens"], val_tokens=t["val_tokens"], docs=t["docs"], encode_mb_per_s=index["encode_mb_per_s"])
    report = "\n".join(lines) + "\n\n" + stats_markdown(stats, plot=rel_plot)
    return StageResult(counts=counts, report=report)
