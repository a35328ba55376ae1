"""Tokenizer benchmark: lmforge vs HF `tokenizers` on the same text in the same run.

  python benchmarks/bench_tokenizer.py [--mb 40] [--vocab-size 16384] [--workers 2]

1. training MB/s: HF byte-level BPE with its default (GPT-2) pre-tokenizer vs lmforge's
   trainer (HF BPE trainer + lmforge's GPT-4-style pre-tokenizer), same text, vocab, specials;
2. encoding MB/s: HF `encode_batch` vs lmforge's tiktoken-backed encode_batch (ids checked
   identical against HF loading lmforge's own tokenizer.json), and lmforge's whole corpus
   encoding (read .jsonl.zst shards, encode, shuffle, write train/val shards);
3. bytes/token on held-out dictionary entries, and per source of the shared corpus (seeded random
   documents of each source, 80% to train the tokenizers on one mixed sample, 20% held out):
   plain byte-level BPE vs lmforge with each digit rule, all at the same vocabulary size.
Input: /work/shared/corpus: dictionary = GCIDE; English prose = the running-text paragraphs of
the docs.python.org crawl (web/python-docs.warc.gz, main text extracted by lmforge.data.extract,
code blocks, interactive sessions, headings and lists left out: see `web_prose`); fortunes, man
pages and the CPython stdlib.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LMFORGE_PROGRESS", "0")

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def read_texts(path: Path, mb: float, skip_mb: float = 0.0, field_filter=None) -> list[str]:
    out, n, skipped = [], 0, 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if field_filter and not field_filter(r):
                continue
            t = r["text"]
            nb = len(t.encode("utf-8"))
            if skipped < skip_mb * 1e6:
                skipped += nb
                continue
            out.append(t)
            n += nb
            if n >= mb * 1e6:
                break
    return out


def sample_texts(path: Path, mb: float, field_filter=None, seed: int = 0) -> list[str]:
    """A seeded random selection of whole documents (not the file's head: files are sorted by name)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [r["text"] for r in map(json.loads, f) if not field_filter or field_filter(r)]
    random.Random(seed).shuffle(rows)
    return cap_bytes(rows, mb)


_WORD = re.compile(r"^[\"'(\[‘“]*[A-Za-z][A-Za-z'’-]*[\"')\]’”.,;:!?]*$")


def _prose_line(line: str) -> bool:
    """An unindented line of words: not code, a prompt, a command or markup."""
    if not line or line[0].isspace() or line.startswith((">>>", "...", "#", "$", "%")):
        return False
    if any(c in line for c in "={}<>|\\`@"):
        return False
    toks = line.split()
    return sum(bool(_WORD.match(t)) for t in toks) >= 0.8 * len(toks)


def prose_paragraphs(text: str, min_words: int = 30) -> str:
    """The running text of an extracted page: blocks of consecutive word lines (hard wraps kept as
    extracted) with at least `min_words` words that end a sentence; the rest (code, sessions,
    headings, tables, signatures, short list items) is left out."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if block and sum(len(x.split()) for x in block) >= min_words and block[-1].rstrip().endswith((".", "?", "!", ":")):
            out.append("\n".join(block))
        block.clear()

    for line in text.split("\n"):
        if _prose_line(line):
            block.append(line)
        else:
            flush()
    flush()
    return "\n".join(out)


def web_prose(warc: Path) -> list[str]:
    """English prose from the web crawl: every page's main text (lmforge's extract step, no time
    limit so the selection does not depend on the machine's load), then its prose paragraphs."""
    from lmforge.data.extract import ExtractConfig, ExtractStep
    from lmforge.data.readers import InputSpec, ReadStats, expand_inputs, read_file

    files = expand_inputs([InputSpec(path=str(warc), source="web")], Path)
    pages = ExtractStep(ExtractConfig(timeout_s=0), sample_removed=0)(
        d for f in files for d in read_file(f, ReadStats()))
    return [p for p in (prose_paragraphs(d.text) for d in pages) if p]


def english_only(texts: list[str]) -> list[str]:
    """The texts lmforge's language ID (lid.176, prepared text) labels English."""
    from lmforge.data.langid import load_model, predict

    model = load_model()
    return [t for t in texts if predict(model, t)[0] == "en"]


def nbytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# HF ByteLevel's built-in (GPT-2) regex with its number rule ` ?\p{N}+` cut to lmforge's groups of up to 3
GPT2_DIGITS3 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def plain_bytelevel(vocab_size: int, specials: list[str], min_frequency: int, digits3: bool = False):
    """The peer: HF's ordinary byte-level BPE (GPT-2 pre-tokenizer regex); `digits3`: same with numbers cut to 3 digits."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if digits3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT2_DIGITS3), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def pattern_bpe(pattern: str):
    """An untrained byte-level BPE built like lmforge's, with another split regex (for ablations)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


# GCIDE's source citations that carry the year: "[1913 Webster]", "[Webster 1913 Suppl.]", "[1913 Webster +PJC]"
CITE_1913 = re.compile(r"\[[^\]\n]*1913[^\]\n]*\]")


def cap_bytes(texts: list[str], mb: float) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= mb * 1e6:
            break
        out.append(t)
        n += len(t.encode("utf-8"))
    return out


def hf_encode(tok, texts: list[str], batch: int = 2000) -> list[list[int]]:
    out = []
    for i in range(0, len(texts), batch):
        out += [e.ids for e in tok.encode_batch(texts[i:i + batch], add_special_tokens=False)]
    return out


def bpt(texts: list[str], ids: list[list[int]]) -> float:
    return nbytes(texts) / max(1, sum(len(x) for x in ids))


def row(name: str, peer: float, ours: float, unit: str) -> None:
    print(f"| {name:<44} | {peer:>10.3f} | {ours:>10.3f} | {ours / peer if peer else float('nan'):>6.2f}x | {unit}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40.0, help="MB of dictionary text to train and encode (default 40)")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--source-mb", type=float, default=3.0, help="MB per source for the per-source comparison")
    args = ap.parse_args()
    if not CORPUS.is_dir():
        print(f"needs {CORPUS}", file=sys.stderr)
        return 2

    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data.corpus_io import write_shard
    from lmforge.data.document import Document
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.encode import encode_corpus
    from lmforge.tokenizer.train_bpe import save_tokenizer, split_pattern, train_tokenizer

    cfg = TokenizerConfig(vocab_size=args.vocab_size)
    dict_path = CORPUS / "dictionary" / "gcide.jsonl.gz"
    texts = read_texts(dict_path, args.mb)
    held = read_texts(dict_path, 2.0, skip_mb=args.mb + 0.5)
    mb = nbytes(texts) / 1e6
    print(f"# input: {dict_path.name}, {len(texts):,} entries, {mb:.1f} MB; held-out dictionary {nbytes(held) / 1e6:.1f} MB; "
          f"vocab {args.vocab_size}; {args.workers} workers; {os.cpu_count()} cores\n")
    print(f"| {'measure':<44} | {'HF peer':>10} | {'lmforge':>10} | {'ratio':>7} | unit")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 9}|------")

    # 1. training
    peer, trainer = plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency)
    t0 = time.perf_counter()
    peer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    t_peer = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_hf = train_tokenizer(texts, cfg)
    t_ours = time.perf_counter() - t0
    row("train byte-level BPE", mb / t_peer, mb / t_ours, "MB/s")

    work = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        save_tokenizer(ours_hf, work / "tok", cfg)
        tok = load_tokenizer(work / "tok")
        same_json = HFTokenizer.from_file(str(work / "tok" / "tokenizer.json"))

        # 2. encoding
        t0 = time.perf_counter()
        hf_encode(peer, texts)
        t_pe = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = hf_encode(same_json, texts)
        t_same = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = []
        for i in range(0, len(texts), 2000):
            ids += tok.encode_batch(texts[i:i + 2000], num_threads=args.workers)
        t_ours_enc = time.perf_counter() - t0
        identical = ids == ref
        row("encode_batch (peer: plain BPE)", mb / t_pe, mb / t_ours_enc, "MB/s")
        row("encode_batch (peer: HF on lmforge tokenizer.json)", mb / t_same, mb / t_ours_enc, "MB/s")
        del ref, ids

        corpus = work / "corpus"
        k = max(1, args.workers * 2)
        step = (len(texts) + k - 1) // k
        for s in range(k):
            write_shard(corpus / f"shard_{s:05d}.jsonl.zst",
                        (Document(f"d{i}", t, {"source": "dictionary"}) for i, t in enumerate(texts[s * step:(s + 1) * step], s * step)))
        t0 = time.perf_counter()
        index = encode_corpus(corpus_shards(corpus), work / "tok", work / "tokens", work / "enc_work", workers=args.workers, seed=1)
        t_corpus = time.perf_counter() - t0
        row("corpus -> token shards (peer: encode_batch)", mb / t_pe, mb / t_corpus, "MB/s")
        print(f"\nids identical to HF tokenizers on the same tokenizer.json: {identical} ({len(texts):,} docs); "
              f"corpus encode wrote {index['totals']['train_tokens']:,} train + {index['totals']['val_tokens']:,} val tokens\n")

        # 3. compression
        print(f"| {'bytes/token (higher is better)':<44} | {'plain BPE':>10} | {'lmforge':>10} | {'ratio':>7} |")
        print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
        ours_held = bpt(held, tok.encode_batch(held))
        row("held-out dictionary (trained on dictionary)", bpt(held, hf_encode(peer, held)), ours_held, "")
        del peer
        peer_d3, trainer_d3 = plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency, digits3=True)
        peer_d3.train_from_iterator(texts, trainer=trainer_d3, length=len(texts))
        row("  same, peer numbers cut to <= 3 digits too", bpt(held, hf_encode(peer_d3, held)), ours_held, "")
        del peer_d3

        sources = {
            "dictionary (GCIDE)": (CORPUS / "dictionary" / "gcide.jsonl.gz", None),
            "web prose (docs.python.org, extracted)": (CORPUS / "web" / "python-docs.warc.gz", None),
            "manpages (en)": (CORPUS / "multilingual" / "manpages.jsonl.gz", lambda r: r.get("lang") == "en"),
            "manpages (other)": (CORPUS / "multilingual" / "manpages.jsonl.gz", lambda r: r.get("lang") != "en"),
            "fortunes": (CORPUS / "multilingual" / "fortunes.jsonl.gz", None),
            "code (CPython stdlib)": (CORPUS / "code" / "python-stdlib.jsonl.gz", None),
        }
        train_mix, evals, n_pages = [], {}, 0
        t0 = time.perf_counter()
        for name, (p, flt) in sources.items():
            if p.name.endswith(".warc.gz"):
                docs = web_prose(p)  # pages in crawl order: shuffle them, seeded, like the others
                n_pages = len(docs)
                random.Random(0).shuffle(docs)
                docs = cap_bytes(docs, args.source_mb * 1.25)
            else:
                docs = sample_texts(p, args.source_mb * 1.25, field_filter=flt)
            cut = max(1, int(len(docs) * 0.8))
            train_mix += docs[:cut]
            evals[name] = docs[cut:]
        t_src = time.perf_counter() - t0
        # eval-only views of the held-out documents (nothing added to the training sample):
        evals["  fortunes, English only (lmforge langid)"] = english_only(evals["fortunes"])
        evals["  dictionary without its 1913 citations"] = [CITE_1913.sub("", t) for t in evals["dictionary (GCIDE)"]]
        evals["  dictionary with every digit removed"] = [re.sub(r"\d", "", t) for t in evals["dictionary (GCIDE)"]]
        random.Random(0).shuffle(train_mix)
        print(f"\n(mixed sample: {nbytes(train_mix) / 1e6:.1f} MB over {len(sources)} sources, held-out 20% per source; "
              f"web prose from {n_pages} pages with running text; sources read and extracted in {t_src:.0f} s)\n")

        peer2, trainer2 = plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency)
        peer2.train_from_iterator(train_mix, trainer=trainer2)
        peer3, trainer3 = plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency, digits3=True)
        peer3.train_from_iterator(train_mix, trainer=trainer3)
        ours: dict[str, object] = {}
        for digits in ("group3", "single"):
            c = TokenizerConfig(vocab_size=args.vocab_size, digits=digits)
            save_tokenizer(train_tokenizer(train_mix, c), work / f"tok_{digits}", c)
            ours[digits] = load_tokenizer(work / f"tok_{digits}")
        # pre-tokenizer ablations: lmforge's trainer with one rule of the default regex changed
        default = split_pattern("group3")
        ablations = {
            "line break kept apart from the word (previous rule)":
                default.replace(r"[^\r\p{L}\p{N}]?+\p{L}+", r"[^\r\n\p{L}\p{N}]?+\p{L}+"),
            "a space joins the number after it":
                default.replace(r"|\p{N}{1,3}|", r"| ?\p{N}{1,3}|"),
        }
        abl = {}
        for name, pattern in ablations.items():
            assert pattern != default, name
            abl[name] = pattern_bpe(pattern)
            abl[name].train_from_iterator(train_mix, trainer=plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency)[1])

        print(f"| {'bytes/token per source (held out)':<44} | {'plain BPE':>10} | {'lmforge':>10} | {'ratio':>7} "
              f"| lmforge digits=single (ratio) | plain BPE, <= 3 digits (lmforge ratio)")
        print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 9}|------|------")
        g3s = {}
        for name, ev in evals.items():
            plain = bpt(ev, hf_encode(peer2, ev))
            g3 = g3s[name] = bpt(ev, ours["group3"].encode_batch(ev))
            single = bpt(ev, ours["single"].encode_batch(ev))
            d3 = bpt(ev, hf_encode(peer3, ev))
            row(name, plain, g3, f"{single:.3f} ({single / plain:.2f}x) | {d3:.3f} ({g3 / d3:.2f}x)")
        print(f"\n| {'pre-tokenizer ablation, bytes/token':<44} | " + " | ".join(ablations)
              + " |  (ratio: lmforge default / ablation)")
        print(f"|{'-' * 46}|" + "------|" * len(ablations))
        for name, ev in evals.items():
            cells = []
            for a, tk in abl.items():
                v = bpt(ev, hf_encode(tk, ev))
                cells.append(f"{v:.3f} ({g3s[name] / v:.3f}x)")
            print(f"| {name:<44} | " + " | ".join(cells) + " |")
        print("\nlmforge = default config (digits = group3); ratios are lmforge / plain BPE unless marked.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
