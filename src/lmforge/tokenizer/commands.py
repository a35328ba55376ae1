"""`lmforge tokenizer train|encode|inspect`: the tokenizer stage's parts, one at a time.

Options of `[tokenizer]` can be set with `--tokenizer.KEY VALUE` (e.g. `--tokenizer.digits single`)
or read from a recipe with `--recipe FILE`; the explicit flags below win.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    from lmforge import config as cfgmod
    from lmforge.errors import ConfigError
    from lmforge.tokenizer.config import TokenizerConfig

    section: dict = {}
    if getattr(args, "recipe", None):
        section = dict(cfgmod.load_toml(args.recipe).get("tokenizer", {}))
    wrapped = {"tokenizer": section}
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if not key.startswith("tokenizer."):
            raise ConfigError(f"override --{key}: only --tokenizer.KEY options apply to `lmforge tokenizer`")
    cfgmod.apply_overrides(wrapped, args.overrides)
    for flag, key in (("vocab_size", "vocab_size"), ("digits", "digits"), ("train_bytes", "train_bytes"),
                      ("val_fraction", "val_fraction"), ("shard_tokens", "shard_tokens")):
        v = getattr(args, flag, None)
        if v is not None:
            wrapped["tokenizer"][key] = v
    return cfgmod.build(TokenizerConfig, wrapped["tokenizer"], "tokenizer")


def _workers(args) -> int:
    import os

    return args.workers or os.cpu_count() or 1


def _cmd_train(args: argparse.Namespace) -> int:
    from lmforge.tokenizer.stage import build_tokenizer

    cfg = _config(args)
    out = Path(args.out)
    stats, index = build_tokenizer(Path(args.corpus), out, Path(args.tokens) if args.tokens else None, cfg, args.seed, _workers(args))
    tr = stats["training"]
    print(f"tokenizer: {out / 'tokenizer.json'} ({stats['vocab_size']} ids), trained on {tr['bytes'] / 1e6:.1f} MB at {tr['mb_per_s']:.2f} MB/s")
    for k, v in stats["sources"].items():
        print(f"  {k:<12} {v['bytes_per_token']:.3f} bytes/token")
    if index:
        print(f"tokens: {args.tokens} ({index['totals']['train_tokens']:,} train, {index['totals']['val_tokens']:,} val) at {index['encode_mb_per_s']:.2f} MB/s")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.encode import encode_corpus

    cfg = _config(args)
    out = Path(args.out)
    index = encode_corpus(corpus_shards(args.corpus), args.tokenizer, out, out.parent / f".{out.name}.work",
                          val_fraction=cfg.val_fraction, shard_tokens=cfg.shard_tokens, dtype=cfg.token_dtype(),
                          seed=args.seed, workers=_workers(args), batch_docs=cfg.batch_docs)
    t = index["totals"]
    print(f"tokens: {out} — {t['docs']:,} docs, {t['train_tokens']:,} train + {t['val_tokens']:,} val tokens, "
          f"{t['bytes_per_token']:.3f} bytes/token, {index['encode_mb_per_s']:.2f} MB/s, {t['corrupt_records']} corrupt records")
    for k, v in index["sources"].items():
        print(f"  {k:<12} {v['bytes_per_token']:.3f} bytes/token ({v['docs']:,} docs)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lmforge.rundir import read_json
    from lmforge.tokenizer.runtime import load_tokenizer
    from lmforge.tokenizer.inspect import show_token, stats_markdown, tokenizer_stats, vocab_profile

    tok = load_tokenizer(args.tokenizer)
    print(f"{tok.path}: {tok.vocab_size} ids, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}, "
          f"{len(tok.special_tokens)} special tokens")
    texts = list(args.text or [])
    if args.file:
        from lmforge.errors import InputError

        try:
            texts.append(Path(args.file).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise InputError(f"cannot read {args.file}: {e.strerror}") from None
    if not sys.stdin.isatty() and args.stdin:
        texts.append(sys.stdin.read())
    for t in texts:
        ids = tok.encode(t)
        nb = len(t.encode("utf-8"))
        print(f"\n{len(ids)} tokens, {nb} bytes, {nb / max(len(ids), 1):.3f} bytes/token")
        shown = ids[: args.max_tokens]
        print("|".join(show_token(tok, i) for i in shown) + (" ..." if len(ids) > len(shown) else ""))
        if args.ids:
            print(json.dumps(shown))
    if not texts:
        stats = read_json(Path(args.tokenizer) / "stats.json") if Path(args.tokenizer).is_dir() else None
        if stats:
            print()
            print(stats_markdown(stats), end="")
        else:
            st = tokenizer_stats(tok, {}, None, args.top, basis="vocabulary")
            print("longest tokens:", ", ".join(f"{t['text']!r}" for t in st["longest_tokens"]))
            print("profile:", json.dumps(vocab_profile(tok)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE, encode a corpus to token shards, inspect a vocabulary")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")

    def common(q, corpus: bool = True):
        if corpus:
            q.add_argument("--recipe", help="read [tokenizer] options from this recipe TOML")
            q.add_argument("--seed", type=int, default=1234, help="sampling and shuffle seed (default 1234)")
            q.add_argument("--workers", type=int, default=0, help="parallel workers (default: all cores)")
            q.add_argument("--val-fraction", dest="val_fraction", type=float, help="share of documents held out for validation")
            q.add_argument("--shard-tokens", dest="shard_tokens", type=int, help="tokens per output shard")

    t = tsub.add_parser("train", help="train a tokenizer on a corpus directory (*.jsonl.zst); optionally encode it too")
    t.add_argument("corpus", help="corpus directory of *.jsonl.zst shards (the data stage's corpus/)")
    t.add_argument("out", help="output tokenizer directory (tokenizer.json, stats.json, ...)")
    t.add_argument("--vocab-size", dest="vocab_size", type=int, help="ids in the vocabulary, special tokens included (default 8192)")
    t.add_argument("--digits", choices=["single", "group3"], help="numbers: one token per digit, or up to 3 digits (default group3)")
    t.add_argument("--train-bytes", dest="train_bytes", type=int, help="bytes of text sampled for training (default 50 MB)")
    t.add_argument("--tokens", help="also encode the corpus into this tokens directory")
    common(t)
    t.set_defaults(func=_cmd_train)

    e = tsub.add_parser("encode", help="encode a corpus into shuffled train/val token shards with a trained tokenizer")
    e.add_argument("corpus", help="corpus directory of *.jsonl.zst shards")
    e.add_argument("tokenizer", help="tokenizer directory (or tokenizer.json)")
    e.add_argument("out", help="output tokens directory (train/, val/, index.json)")
    common(e)
    e.set_defaults(func=_cmd_encode)

    i = tsub.add_parser("inspect", help="show a tokenizer's figures, or how it splits some text")
    i.add_argument("tokenizer", help="tokenizer directory (or tokenizer.json)")
    i.add_argument("--text", action="append", help="text to tokenize (repeatable)")
    i.add_argument("--file", help="tokenize this file")
    i.add_argument("--stdin", action="store_true", help="tokenize standard input")
    i.add_argument("--ids", action="store_true", help="also print the token ids")
    i.add_argument("--max-tokens", dest="max_tokens", type=int, default=200, help="show at most this many tokens (default 200)")
    i.add_argument("--top", type=int, default=20, help="how many longest tokens to list without stats.json")
    i.set_defaults(func=_cmd_inspect)

    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])
