"""Tokenizer benchmark: lmforge's encoder vs HF `tokenizers`, both running the SAME tokenizer.json.

  python benchmarks/bench_tokenizer.py [--threads 2] [--mb 40] [--source-mb 4] [--vocab 4096,16384,32768]
                                       [--rounds 2] [--quick] [--compression]

The tokenizers are lmforge's (`lmforge.tokenizer.train_bpe`: HF's BPE trainer with lmforge's
pre-tokenizer regex), one per vocabulary size, trained on a seeded mixed sample of every corpus
source (the timed text is a disjoint sample). Both sides load the same tokenizer.json:
  * lmforge: `lmforge.tokenizer.Tokenizer.from_file` (tiktoken backend built from that file's
    vocabulary and regex; batches split into chunks on a thread pool);
  * peer: `tokenizers.Tokenizer.from_file(same file)`, its `encode_batch` (Rust, rayon threads).
Both get the same thread count (`--threads`, default: the machine's cores; the peer through
RAYON_NUM_THREADS, set before its first call). Rounds alternate which side goes first; the
figure per side is the median over rounds, min-max printed.

1. headline, corpus -> token shards: `--mb` MB of GCIDE written as one .jsonl.zst corpus shard,
   then `lmforge.tokenizer.encode.encode_corpus` run twice with everything the same except the
   encoder: `backend="tiktoken"` (lmforge) vs `backend="tokenizers"` (HF on the same file). The
   timer covers the whole call on both sides: read + decompress + JSON, encode, ids -> uint32,
   token counts, global shuffle, train/val shards written. The shards written are compared byte for
   byte (asserted identical). Left out: writing the corpus shard, training and loading the tokenizer.
2. in-memory encode, per source and per vocabulary size: a list of str already in memory -> ids;
   lmforge `Tokenizer.encode_batch` (list of lists of ints) vs HF `encode_batch` + `.ids` per
   Encoding (the way to get ids out of it); ids asserted identical. Left out: reading the text.
   Sources (/work/shared/corpus): dictionary = GCIDE; web = main text of the docs.python.org crawl
   (web/python-docs.warc.gz, extracted by lmforge.data.extract, cached in benchmarks/out/cache);
   manpages (English / other languages); fortunes; code = CPython stdlib.
3. `--compression` (off by default, slow): bytes/token of lmforge's tokenizer vs a plain GPT-2-regex
   byte-level BPE of the same size, per source, digit rules and pre-tokenizer ablations.
The last stdout line is `RESULT {...}` (benchmarks/_bench.py) with the headline ratio.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import result

os.environ.setdefault("LMFORGE_PROGRESS", "0")

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[0].parent / "shared" / "corpus"
CACHE = HERE / "out" / "cache"


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


def web_pages(warc: Path) -> list[str]:
    """The main text of every page of the crawl (lmforge's extract step, no time limit so the selection
    does not depend on the machine's load); cached in benchmarks/out/cache (minutes to extract under load)."""
    st = warc.stat()
    cache = CACHE / f"{warc.name}.{st.st_size}.{int(st.st_mtime)}.extracted.json.gz"
    if cache.is_file():
        with gzip.open(cache, "rt", encoding="utf-8") as f:
            return json.load(f)
    from lmforge.data.extract import ExtractConfig, ExtractStep
    from lmforge.data.readers import InputSpec, ReadStats, expand_inputs, read_file

    files = expand_inputs([InputSpec(path=str(warc), source="web")], Path)
    pages = [d.text for d in ExtractStep(ExtractConfig(timeout_s=0), sample_removed=0)(
        d for f in files for d in read_file(f, ReadStats())) if d.text]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(pages, f)
    tmp.replace(cache)
    return pages


def web_prose(warc: Path) -> list[str]:
    """English prose from the web crawl: every page's main text (`web_pages`), then its prose paragraphs."""
    return [p for p in (prose_paragraphs(t) for t in web_pages(warc)) if p]


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





def compression(args, work: Path) -> None:
    """Bytes/token: lmforge's tokenizer vs a plain byte-level BPE of the same size (section 3)."""
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.train_bpe import save_tokenizer, split_pattern, train_tokenizer

    args.vocab_size = args.compression_vocab
    cfg = TokenizerConfig(vocab_size=args.vocab_size)
    dict_path = CORPUS / "dictionary" / "gcide.jsonl.gz"
    texts = read_texts(dict_path, args.mb)
    held = read_texts(dict_path, 2.0, skip_mb=args.mb + 0.5)
    peer, trainer = plain_bytelevel(args.vocab_size, cfg.special_tokens, cfg.min_frequency)
    peer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    save_tokenizer(train_tokenizer(texts, cfg), work / "tok", cfg)
    tok = load_tokenizer(work / "tok")
    print(f"\n## bytes/token, vocab {args.vocab_size}: tokenizers trained on {nbytes(texts) / 1e6:.1f} MB of GCIDE\n")
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

SOURCES = {
    "dictionary (GCIDE)": ("dictionary/gcide.jsonl.gz", None),
    "web (docs.python.org, extracted)": ("web/python-docs.warc.gz", None),
    "manpages (en)": ("multilingual/manpages.jsonl.gz", lambda r: r.get("lang") == "en"),
    "manpages (other languages)": ("multilingual/manpages.jsonl.gz", lambda r: r.get("lang") != "en"),
    "fortunes": ("multilingual/fortunes.jsonl.gz", None),
    "code (CPython stdlib)": ("code/python-stdlib.jsonl.gz", None),
}

SHORT = dict(zip(SOURCES, ("dictionary", "web", "manpages_en", "manpages_other", "fortunes", "code")))


def source_samples(mb: float) -> dict[str, tuple[list[str], list[str]]]:
    """Per source: (training half, timed half), seeded random documents, about `mb` MB each."""
    out = {}
    for name, (rel, flt) in SOURCES.items():
        p = CORPUS / rel
        if p.name.endswith(".warc.gz"):
            docs = web_pages(p)
            random.Random(0).shuffle(docs)
            docs = cap_bytes(docs, 2 * mb)
        else:
            docs = sample_texts(p, 2 * mb, field_filter=flt)
        out[name] = (docs[0::2], docs[1::2])
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def alternate(ours, peer, rounds: int) -> tuple[list[float], list[float], object, object]:
    """Run both sides `rounds` times, alternating which goes first; seconds per round and last outputs."""
    t_o, t_p, out_o, out_p = [], [], None, None
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                t, out_o = timed(ours)
                t_o.append(t)
            else:
                t, out_p = timed(peer)
                t_p.append(t)
    return t_o, t_p, out_o, out_p


def spread(mb: float, ts: list[float]) -> str:
    return f"{mb / statistics.median(ts):.2f} ({mb / max(ts):.2f}-{mb / min(ts):.2f})"


def same_tree(a: Path, b: Path) -> bool:
    """The token shards (train/ and val/) of two encode_corpus outputs are byte-identical."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*.bin"))
    fb = sorted(p.relative_to(b) for p in b.rglob("*.bin"))
    return bool(fa) and fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for BOTH sides (default: cores)")
    ap.add_argument("--mb", type=float, default=40.0, help="MB of GCIDE for the corpus -> shards headline (default 40)")
    ap.add_argument("--source-mb", type=float, default=4.0, help="MB timed per source in the per-source table (default 4)")
    ap.add_argument("--vocab", default="4096,16384,32768", help="vocabulary sizes (default 4096,16384,32768)")
    ap.add_argument("--headline-vocab", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per measurement (default 2)")
    ap.add_argument("--quick", action="store_true", help="--mb 8 --source-mb 1 --vocab 4096,16384")
    ap.add_argument("--compression", action="store_true", help="also the bytes/token tables (slow)")
    ap.add_argument("--compression-vocab", type=int, default=16384)
    args = ap.parse_args()
    if args.quick:
        args.mb, args.source_mb, args.vocab = min(args.mb, 8.0), min(args.source_mb, 1.0), "4096,16384"
    if not CORPUS.is_dir():
        print(f"needs {CORPUS}", file=sys.stderr)
        return 2
    try:
        vocabs = sorted({int(v) for v in args.vocab.split(",")} | {args.headline_vocab})
    except ValueError:
        print(f"--vocab: comma-separated integers, got {args.vocab!r}", file=sys.stderr)
        return 2
    if args.threads < 1 or args.rounds < 1:
        print("--threads and --rounds must be >= 1", file=sys.stderr)
        return 2
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # HF tokenizers' pool is built at its first batch call
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data.corpus_io import write_shard
    from lmforge.data.document import Document
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.encode import encode_corpus
    from lmforge.tokenizer.train_bpe import save_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        t0 = time.perf_counter()
        samples = source_samples(args.source_mb)
        mix = [t for tr, _ in samples.values() for t in tr]
        random.Random(0).shuffle(mix)
        print(f"# {args.threads} threads on both sides ({os.cpu_count()} cores); rounds {args.rounds} (alternating); "
              f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        print(f"# tokenizers trained on a {nbytes(mix) / 1e6:.1f} MB mixed sample of {len(samples)} sources "
              f"(sources read in {time.perf_counter() - t0:.0f} s); vocabularies {vocabs}")
        tok_dirs = {}
        for v in vocabs:
            cfg = TokenizerConfig(vocab_size=v)
            save_tokenizer(train_tokenizer(mix, cfg), work / f"tok{v}", cfg)
            tok_dirs[v] = work / f"tok{v}"
        del mix

        # ---- 1. headline: corpus -> token shards, same code path, only the encoder differs
        dict_path = CORPUS / "dictionary" / "gcide.jsonl.gz"
        texts = read_texts(dict_path, args.mb)
        mb = nbytes(texts) / 1e6
        write_shard(work / "corpus" / "shard_00000.jsonl.zst",
                    (Document(f"d{i}", t, {"source": "dictionary"}) for i, t in enumerate(texts)))
        del texts
        shards = corpus_shards(work / "corpus")
        hv = args.headline_vocab

        def run(backend: str):
            out = work / f"tokens_{backend}"
            shutil.rmtree(out, ignore_errors=True)
            return encode_corpus(shards, tok_dirs[hv], out, work / f"enc_{backend}", workers=args.threads, seed=1, backend=backend)

        load0 = os.getloadavg()[0]
        t_o, t_p, idx_o, idx_p = alternate(lambda: run("tiktoken"), lambda: run("tokenizers"), args.rounds)
        identical = same_tree(work / "tokens_tiktoken", work / "tokens_tokenizers")
        headline = statistics.median(t_p) / statistics.median(t_o)
        print(f"\n## 1. corpus -> token shards, {mb:.1f} MB of GCIDE ({idx_o['totals']['docs']:,} entries) in one .jsonl.zst, "
              f"vocab {hv}, load {load0:.2f}\n")
        print("| side | MB/s median (min-max) | seconds per round |")
        print("|---|---|---|")
        print(f"| HF tokenizers {__import__('tokenizers').__version__} (encode_corpus backend=tokenizers) | {spread(mb, t_p)} | "
              + " ".join(f"{t:.2f}" for t in t_p) + " |")
        print(f"| lmforge (tiktoken backend) | {spread(mb, t_o)} | " + " ".join(f"{t:.2f}" for t in t_o) + " |")
        print(f"\nratio {headline:.2f}x; token shards byte-identical: {identical} "
              f"({idx_o['totals']['train_tokens']:,} train + {idx_o['totals']['val_tokens']:,} val tokens)")
        assert identical, "the two encoders wrote different token shards"

        # ---- 2. in-memory encode per source and vocabulary size
        print(f"\n## 2. in-memory encode_batch, MB/s median (min-max) over {args.rounds} rounds, ids asserted identical\n")
        print("| source | MB | vocab | HF tokenizers | lmforge | ratio |")
        print("|---|---|---|---|---|---|")
        ratios: dict[str, float] = {}
        for v in vocabs:
            ours = Tokenizer.from_file(tok_dirs[v])
            peer = HFTokenizer.from_file(str(tok_dirs[v] / "tokenizer.json"))
            assert ours.backend == "tiktoken"
            for name, (_, timed_texts) in samples.items():
                smb = nbytes(timed_texts) / 1e6
                t_o, t_p, ids_o, ids_p = alternate(
                    lambda: ours.encode_batch(timed_texts, num_threads=args.threads),
                    lambda: [e.ids for e in peer.encode_batch(timed_texts, add_special_tokens=False)], args.rounds)
                assert ids_o == ids_p, f"ids differ: {name}, vocab {v}"
                r = statistics.median(t_p) / statistics.median(t_o)
                ratios[f"{SHORT[name]}@{v}"] = round(r, 2)
                print(f"| {name} | {smb:.1f} | {v} | {spread(smb, t_p)} | {spread(smb, t_o)} | {r:.2f}x |")
        print(f"\nin-memory ratio over all rows: median {statistics.median(ratios.values()):.2f}x, "
              f"min {min(ratios.values()):.2f}x, max {max(ratios.values()):.2f}x")

        if args.compression:
            compression(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result("tokenizer", headline, 2.0, f"corpus -> token shards, {mb:.0f} MB GCIDE, vocab {hv}, same tokenizer.json, "
           f"{args.threads} threads each: lmforge (tiktoken) vs HF tokenizers", identical=identical,
           in_memory_median=round(statistics.median(ratios.values()), 2), in_memory_min=min(ratios.values()),
           in_memory=ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
