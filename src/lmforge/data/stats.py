"""Reading and presenting the data stage's statistics (`corpus/stats.json`, `corpus/removed/`).

Used by the stage report, `lmforge data stats` and `lmforge data inspect`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import InputError
from lmforge.rundir import read_json


def corpus_dir(path: str | Path) -> Path:
    """Accept a run directory or its corpus/ directory."""
    p = Path(path)
    if (p / "stats.json").is_file():
        return p
    if (p / "corpus" / "stats.json").is_file():
        return p / "corpus"
    raise InputError(f"{p}: no stats.json here or in {p / 'corpus'}; run the data stage first (lmforge data run ...)")


def load_stats(path: str | Path) -> dict:
    c = corpus_dir(path)
    s = read_json(c / "stats.json")
    if not isinstance(s, dict) or "steps" not in s:
        raise InputError(f"{c / 'stats.json'} is not a data-stage stats file")
    return s


def _top_reasons(dropped: dict, n: int = 3) -> str:
    items = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    s = ", ".join(f"{k} {v:,}" for k, v in items[:n])
    return s + (f", +{len(items) - n} more" if len(items) > n else "")


def step_rows(stats: dict) -> list[list[str]]:
    rows = []
    for s in stats["steps"]:
        kept = f"{100 * s['docs_out'] / s['docs_in']:.1f}%" if s["docs_in"] else "-"
        rows.append([
            s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", kept, f"{s['chars_in']:,}", f"{s['chars_out']:,}",
            _top_reasons(s.get("dropped", {})) or "-", f"{s.get('time_s', 0):.2f}",
        ])
    return rows


STEP_HEADER = ["step", "docs in", "docs out", "kept", "chars in", "chars out", "drops (top reasons)", "time s"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def domain_rows(stats: dict, n: int = 15) -> list[list[str]]:
    return [[d["domain"], f"{d['docs']:,}", f"{d['tokens']:,}"] for d in stats.get("top_domains", [])[:n]]


def source_rows(stats: dict) -> list[list[str]]:
    return [[k, f"{v['docs_read']:,}", f"{v['docs_out']:,}", f"{v['tokens_out']:,}"] for k, v in stats.get("sources", {}).items()]


def plot_funnel(stats: dict, path: Path) -> Path | None:
    """Bar chart of documents remaining after each step (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    from lmforge.rundir import atomic_file

    steps = stats["steps"]
    names = [s["name"] for s in steps]
    docs = [s["docs_out"] for s in steps]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.5))
    ax.bar(range(len(names)), docs, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("documents after step")
    ax.set_title("data pipeline: documents kept per step")
    for i, v in enumerate(docs):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def report_section(stats: dict, plot_rel: str | None = None) -> str:
    t = stats["totals"]
    parts = [
        f"{t['docs_out']:,} documents ({t['tokens_out']:,} whitespace tokens, {t['chars_out']:,} characters) kept "
        f"of {t['docs_read']:,} read from {t['input_files']} input file(s), in {t['shards']} shard(s); "
        f"{t['corrupt_records']:,} corrupt record(s) skipped.",
        "",
        markdown_table(STEP_HEADER, step_rows(stats)),
    ]
    if plot_rel:
        parts += ["", f"![documents per step]({plot_rel})"]
    if stats.get("sources"):
        parts += ["", "Per source:", "", markdown_table(["source", "docs read", "docs out", "tokens out"], source_rows(stats))]
    if stats.get("top_domains"):
        parts += ["", "Top domains by kept tokens (documents without a URL are grouped by `(source)`):", "",
                  markdown_table(["domain", "docs", "tokens"], domain_rows(stats, 10))]
    return "\n".join(parts) + "\n"


def load_removed(path: str | Path, step: str | None = None) -> dict[str, list[dict]]:
    """step name -> removed-sample records (each with `reason`)."""
    rdir = corpus_dir(path) / "removed"
    out: dict[str, list[dict]] = {}
    files = sorted(rdir.glob("*.jsonl")) if rdir.is_dir() else []
    if step is not None:
        names = [p.stem for p in files]
        if step not in names:
            raise InputError(f"no removed samples for step {step!r}; steps with samples: {', '.join(names) or 'none'}")
        files = [rdir / f"{step}.jsonl"]
    for p in files:
        out[p.stem] = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out
