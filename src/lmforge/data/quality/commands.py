"""`lmforge data train-quality | topics | search` (registered by lmforge.data.commands)."""

from __future__ import annotations

import argparse
import itertools
import json

from lmforge.errors import ConfigError, InputError


def register(data_sub: argparse._SubParsersAction) -> None:
    t = data_sub.add_parser(
        "train-quality",
        help="train a quality model: fastText good/bad classifier, embedding head, or Kneser-Ney n-gram model",
        description=(
            "Inputs (--good/--bad/--scored) are run or corpus directories (their *.jsonl.zst shards), "
            "corpus/removed/*.jsonl samples, .jsonl[.gz|.zst] files with a 'text' field, or .txt files. "
            "fasttext/embedding: a good/bad classifier (or, for embedding, a regression on --scored). "
            "perplexity: an n-gram model of the --good reference text."
        ),
    )
    t.add_argument("--kind", choices=["fasttext", "embedding", "perplexity"], default="fasttext")
    t.add_argument("--good", nargs="+", default=[], metavar="PATH", help="good examples (perplexity: the reference corpus)")
    t.add_argument("--bad", nargs="+", default=[], metavar="PATH", help="bad examples")
    t.add_argument("--scored", nargs="+", default=[], metavar="PATH", help="embedding only: JSONL with 'text' and a numeric 'score' (ridge head)")
    t.add_argument("--out", required=True, help="model file to write (.bin for fasttext, .safetensors for embedding, .npz for perplexity)")
    t.add_argument("--limit", type=int, default=0, help="read at most this many examples per class (0 = all)")
    t.add_argument("--valid-fraction", type=float, default=0.1, help="held-out share for the reported accuracy (default 0.1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epoch", type=int, default=20, help="fasttext epochs (default 20)")
    t.add_argument("--lr", type=float, default=0.1, help="fasttext learning rate (default 0.1)")
    t.add_argument("--dim", type=int, default=64, help="fasttext vector size (default 64)")
    t.add_argument("--word-ngrams", type=int, default=2, help="fasttext word n-grams (default 2: unigrams + bigrams)")
    t.add_argument("--max-per-class", type=int, default=0, help="cap examples per class after balancing (embedding default 2000)")
    t.add_argument("--order", type=int, default=5, help="perplexity: n-gram order (default 5)")
    t.add_argument("--max-tokens", type=int, default=5_000_000, help="perplexity: training tokens (default 5M)")
    t.add_argument("--calibrate", nargs="+", default=[], metavar="PATH", help="perplexity: documents whose 33/67th percentiles set the head/middle/tail cutoffs")
    t.set_defaults(func=_cmd_train)

    p = data_sub.add_parser("topics", help="cluster a sample of a corpus into topics (MiniLM + k-means), name, count and map them")
    p.add_argument("corpus", help="run directory or corpus directory")
    p.add_argument("--k", type=int, default=12, help="number of clusters (default 12)")
    p.add_argument("--sample", type=int, default=2000, help="documents to embed (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default CORPUS/topics)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_cmd_topics)

    s = data_sub.add_parser("search", help="full-text search over a corpus (SQLite FTS5, index cached in corpus/.search/)")
    s.add_argument("corpus", help="run directory or corpus directory")
    s.add_argument("query", help='FTS5 query: words, "a phrase", a OR b, prefix*, source:web')
    s.add_argument("--limit", type=int, default=10)
    s.add_argument("--rebuild", action="store_true", help="rebuild the index even if it is current")
    s.add_argument("--json", action="store_true", help="print one JSON object per hit")
    s.set_defaults(func=_cmd_search)


def _texts(paths: list[str], limit: int) -> list[str]:
    from lmforge.data.quality.common import expand_inputs, iter_texts

    stats: dict = {}
    it = iter_texts(expand_inputs(paths), stats)
    texts = list(itertools.islice(it, limit) if limit else it)
    if stats.get("corrupt"):
        print(f"skipped {stats['corrupt']} unreadable records")
    if not texts:
        raise InputError(f"no texts found in {' '.join(paths)}")
    return texts


def _scored(paths: list[str], limit: int) -> list[tuple[str, float]]:
    from lmforge.data.quality.common import _open_text, expand_inputs

    rows: list[tuple[str, float]] = []
    bad = 0
    for p in expand_inputs(paths):
        with _open_text(p) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    rows.append((str(r["text"]), float(r["score"])))
                except (ValueError, KeyError, TypeError):
                    bad += 1
                if limit and len(rows) >= limit:
                    break
    if bad:
        print(f"skipped {bad} records without 'text' and a numeric 'score'")
    if not rows:
        raise InputError(f"no scored examples in {' '.join(paths)}")
    return rows


def _cmd_train(args) -> int:
    if not 0.0 <= args.valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if args.kind == "perplexity":
        if not args.good:
            raise ConfigError("--kind perplexity needs the reference corpus as --good")
        from lmforge.data.quality.perplexity import train_kn

        calib = _texts(args.calibrate, 5000) if args.calibrate else None
        info = train_kn(_texts(args.good, args.limit), args.out, order=args.order, max_tokens=args.max_tokens, calibrate=calib)
    elif args.kind == "embedding":
        from lmforge.data.quality.embedding import train_embedding_head

        if args.scored:
            info = train_embedding_head(None, None, args.out, scored=_scored(args.scored, args.limit), valid_fraction=args.valid_fraction,
                                        seed=args.seed, max_per_class=args.max_per_class or 2000)
        else:
            if not args.good or not args.bad:
                raise ConfigError("--kind embedding needs --good and --bad (or --scored)")
            info = train_embedding_head(_texts(args.good, args.limit), _texts(args.bad, args.limit), args.out,
                                        valid_fraction=args.valid_fraction, seed=args.seed, max_per_class=args.max_per_class or 2000)
    else:
        if not args.good or not args.bad:
            raise ConfigError("--kind fasttext needs --good and --bad examples")
        from lmforge.data.quality.fasttext_clf import train_fasttext

        info = train_fasttext(_texts(args.good, args.limit), _texts(args.bad, args.limit), args.out, valid_fraction=args.valid_fraction,
                              seed=args.seed, epoch=args.epoch, lr=args.lr, dim=args.dim, word_ngrams=args.word_ngrams,
                              max_per_class=args.max_per_class)
    print(json.dumps(info, indent=2))
    print(f"model: {args.out}")
    return 0


def _cmd_topics(args) -> int:
    from lmforge.data.quality.topics import compute_topics, topics_markdown

    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    summary = compute_topics(args.corpus, args.out, k=args.k, sample=args.sample, seed=args.seed, batch_size=args.batch_size)
    print(topics_markdown(summary))
    from pathlib import Path

    out = Path(args.out) if args.out else Path(summary["corpus"]) / "topics"
    print(f"topics: {out / 'topics.json'}\nmap: {out / 'topic_map.png'}\ncentroids: {out / 'centroids.safetensors'}")
    return 0


def _cmd_search(args) -> int:
    from lmforge.data.search import search

    hits = search(args.corpus, args.query, limit=args.limit, rebuild=args.rebuild)
    if args.json:
        for h in hits:
            print(json.dumps(h, ensure_ascii=False))
        return 0
    if not hits:
        print("no matches")
    for h in hits:
        where = h["url"] or h["source"]
        print(f"{h['rank']:>3}. {h['id']}  score {h['score']:.2f}  {where}\n     {h['snippet']}")
    return 0
