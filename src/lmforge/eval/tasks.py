"""Task formats and loaders.

Two kinds of task, each a list of examples plus a spec:

* multiple choice — `{"query": str, "choices": [str, ...], "gold": int | [int, ...]}` per JSONL
  line (optional `"contexts": [str, ...]`, one context per choice, for partial scoring as in
  WinoGrande). The model scores `template(query) + delimiter + choice` for every choice.
* generative — `{"prompt": str, "answers": [str, ...], "stop": [str, ...]}` per line; the model
  decodes greedily until a stop sequence and is scored by exact match and F1.

A task is described by a small TOML spec next to its data:

    name = "my_task"
    type = "multiple_choice"          # or "generative"
    data = "my_task.jsonl"            # relative to the spec file (.jsonl, .jsonl.gz, .csv, .parquet)
    format = "lmforge"                # or hellaswag, arc, piqa, winogrande, openbookqa, mmlu
    num_fewshot = 0
    fewshot_seed = 1234
    template = "{query}"              # str.format over the record's fields
    target_delimiter = " "
    fewshot_delimiter = "\\n\\n"
    metrics = ["acc", "acc_norm"]     # acc, acc_norm, acc_tok, acc_pmi | exact_match, f1
    max_new_tokens = 32               # generative only
    limit = 0                         # 0 = all examples

Loaders read the public benchmark files as they are distributed (their JSONL, CSV or parquet
layouts) and turn each record into the multiple-choice format with the prompts commonly used
to report these benchmarks.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from lmforge import config as cfgmod
from lmforge.errors import InputError
from lmforge.log import logger

MC_METRICS = ("acc", "acc_norm", "acc_tok", "acc_pmi")
GEN_METRICS = ("exact_match", "f1")


@dataclass
class MCExample:
    query: str
    choices: list[str]
    gold: list[int]
    contexts: list[str] | None = None  # per-choice contexts (partial scoring)
    id: str = ""


@dataclass
class GenExample:
    prompt: str
    answers: list[str]
    stop: list[str] = field(default_factory=list)
    id: str = ""


@dataclass
class TaskSpec:
    name: str = ""
    type: Literal["multiple_choice", "generative"] = "multiple_choice"
    data: str = ""
    format: Literal["lmforge", "hellaswag", "arc", "piqa", "winogrande", "openbookqa", "mmlu"] = "lmforge"
    labels: str = ""  # PIQA: separate labels file (one 0/1 per line), relative to the spec
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    template: str = "{query}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    metrics: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    limit: int = 0
    description: str = ""  # text placed before the few-shot examples

    def validate(self) -> None:
        if not self.name:
            raise ValueError("task spec needs a 'name'")
        if not self.data:
            raise ValueError("task spec needs 'data' (path of the examples file)")
        allowed = MC_METRICS if self.type == "multiple_choice" else GEN_METRICS
        if not self.metrics:
            self.metrics = ["acc", "acc_norm"] if self.type == "multiple_choice" else ["exact_match", "f1"]
        for m in self.metrics:
            if m not in allowed:
                raise ValueError(f"metrics: {m!r} is not a {self.type} metric; choose from {', '.join(allowed)}")
        if self.num_fewshot < 0 or self.limit < 0 or self.max_new_tokens < 1:
            raise ValueError("num_fewshot and limit must be >= 0, max_new_tokens >= 1")
        if self.type == "generative" and self.format != "lmforge":
            raise ValueError(f"format {self.format!r} is a multiple-choice format; generative tasks use format = 'lmforge'")


@dataclass
class Task:
    spec: TaskSpec
    examples: list[Any]  # MCExample | GenExample
    fewshot_pool: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


# ---- reading records ------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line/row number, record) from .jsonl[.gz|.zst], .json (a list), .csv (rows as lists) or .parquet.
    A line that is not valid JSON is counted, logged once with its location, and skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task data not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"cannot read parquet {path}: {e}") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row
        return
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                if row:
                    yield i, row
        return
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, 1)
        return
    opener: Callable[[], Any]
    if name.endswith(".gz"):
        opener = lambda: gzip.open(path, "rt", encoding="utf-8")  # noqa: E731
    elif name.endswith(".zst"):
        import zstandard

        opener = lambda: io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")  # noqa: E731
    else:
        opener = lambda: open(path, encoding="utf-8")  # noqa: E731
    bad = 0
    with opener() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                if bad == 1:
                    logger.warning("%s:%d: not valid JSON, skipped (further bad lines counted silently)", path, i)
    if bad:
        logger.warning("%s: %d corrupt line(s) skipped", path, bad)


# ---- public benchmark layouts ---------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def conv_hellaswag(r: dict, i: int) -> MCExample:
    """HellaSwag (rowanz/hellaswag JSONL, or the Hugging Face parquet: same fields, label as a string)."""
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    query = _hellaswag_clean(r.get("activity_label", "") + ": " + ctx)
    label = r.get("label")
    if label is None or label == "":
        raise KeyError("label")
    return MCExample(query, [_hellaswag_clean(e) for e in r["endings"]], [int(label)], id=str(r.get("ind", i)))


def _mc_choices(choices: Any) -> tuple[list[str], list[str]]:
    """ARC/OpenBookQA choices: AI2 JSONL list of {text, label} or HF {"text": [...], "label": [...]}."""
    if isinstance(choices, dict):
        return list(choices["text"]), [str(x) for x in choices["label"]]
    return [c["text"] for c in choices], [str(c["label"]) for c in choices]


def conv_arc(r: dict, i: int) -> MCExample:
    """ARC (AI2 JSONL: question.stem + question.choices; HF parquet: question + choices{text,label})."""
    q = r["question"]
    if isinstance(q, dict):
        stem, (texts, labels) = q["stem"], _mc_choices(q["choices"])
    else:
        stem, (texts, labels) = q, _mc_choices(r["choices"])
    key = str(r["answerKey"])
    if key not in labels:  # some ARC items use 1-4 instead of A-D
        raise KeyError(f"answerKey {key!r} not among labels {labels}")
    return MCExample(f"Question: {stem}\nAnswer:", texts, [labels.index(key)], id=str(r.get("id", i)))


def conv_openbookqa(r: dict, i: int) -> MCExample:
    """OpenBookQA (AI2 JSONL: question.stem/choices; HF parquet: question_stem + choices{text,label})."""
    if "question_stem" in r:
        stem, (texts, labels) = r["question_stem"], _mc_choices(r["choices"])
    else:
        stem, (texts, labels) = r["question"]["stem"], _mc_choices(r["question"]["choices"])
    return MCExample(stem, texts, [labels.index(str(r["answerKey"]))], id=str(r.get("id", i)))


def conv_piqa(r: dict, i: int, label: int | None = None) -> MCExample:
    """PIQA (ybisk/piqa: goal, sol1, sol2 with labels in a separate .lst file; HF: with `label`)."""
    lab = label if label is not None else r.get("label")
    if lab is None:
        raise KeyError("label (set `labels` in the spec to the -labels.lst file)")
    return MCExample(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], [int(lab)], id=str(r.get("id", i)))


def conv_winogrande(r: dict, i: int) -> MCExample:
    """WinoGrande (sentence with one '_', option1, option2, answer '1'/'2'): partial scoring —
    the context is the sentence up to the blank with the option filled in, the continuation is
    the rest of the sentence, identical for both options."""
    s = r["sentence"]
    cut = s.index("_")
    rest = s[cut + 1 :].strip()
    contexts = [s[:cut] + r["option1"], s[:cut] + r["option2"]]
    ans = str(r.get("answer", ""))
    if ans not in ("1", "2"):
        raise KeyError("answer")
    return MCExample("", [rest, rest], [int(ans) - 1], contexts=contexts, id=str(r.get("qID", i)))


def _mmlu_prompt(question: str, choices: list[str], subject: str) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" if subject else ""
    opts = "".join(f"{_LETTERS[k]}. {c.strip()}\n" for k, c in enumerate(choices))
    return f"{head}{question.strip()}\n{opts}Answer:"


def conv_mmlu(r: Any, i: int, subject: str = "") -> MCExample:
    """MMLU: the original CSVs (question, A, B, C, D, answer letter; no header; subject from the
    file name `<subject>_test.csv`) or the HF parquet (question, subject, choices, answer index)."""
    if isinstance(r, list):
        if len(r) < 6:
            raise KeyError(f"expected 6 columns, got {len(r)}")
        q, choices, ans = r[0], r[1:5], r[5].strip()
        gold = _LETTERS.index(ans)
    else:
        q, choices = r["question"], list(r["choices"])
        ans = r["answer"]
        gold = _LETTERS.index(ans) if isinstance(ans, str) else int(ans)
        subject = r.get("subject", subject)
    letters = [_LETTERS[k] for k in range(len(choices))]
    return MCExample(_mmlu_prompt(q, choices, subject), letters, [gold], id=f"{subject}-{i}")


CONVERTERS: dict[str, Callable[..., MCExample]] = {
    "hellaswag": conv_hellaswag,
    "arc": conv_arc,
    "openbookqa": conv_openbookqa,
    "piqa": conv_piqa,
    "winogrande": conv_winogrande,
    "mmlu": conv_mmlu,
}


def _native(r: dict, i: int, kind: str) -> Any:
    if kind == "multiple_choice":
        gold = r["gold"]
        gold = [int(g) for g in gold] if isinstance(gold, list) else [int(gold)]
        choices = [str(c) for c in r["choices"]]
        if not choices or any(not 0 <= g < len(choices) for g in gold):
            raise KeyError(f"gold {gold} out of range for {len(choices)} choices")
        ctxs = r.get("contexts")
        if ctxs is not None and len(ctxs) != len(choices):
            raise KeyError("contexts must have one entry per choice")
        return MCExample(str(r.get("query", "")), choices, gold, contexts=ctxs, id=str(r.get("id", i)))
    answers = r["answers"]
    answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    return GenExample(str(r["prompt"]), answers, [str(s) for s in r.get("stop", [])], id=str(r.get("id", i)))


def load_examples(spec: TaskSpec, data: Path, labels: Path | None = None) -> list[Any]:
    """Read and convert a task's records; corrupt or incomplete records are counted and skipped."""
    lab: list[int] | None = None
    if labels is not None:
        if not labels.is_file():
            raise InputError(f"labels file not found: {labels}")
        lab = [int(x) for x in labels.read_text().split()]
    subject = ""
    if spec.format == "mmlu" and data.name.endswith(".csv"):
        subject = re.sub(r"_(test|dev|val)$", "", data.stem)
    out, bad = [], 0
    for n, (i, r) in enumerate(read_records(data)):
        try:
            if spec.format == "lmforge":
                ex = _native(r, i, spec.type)
            elif spec.format == "piqa":
                ex = conv_piqa(r, i, lab[n] if lab is not None and n < len(lab) else None)
            elif spec.format == "mmlu":
                ex = conv_mmlu(r, i, subject)
            else:
                ex = CONVERTERS[spec.format](r, i)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            bad += 1
            if bad == 1:
                logger.warning("%s: record %d is not a valid %s record (%s), skipped", data, i, spec.format, e)
            continue
        out.append(ex)
    if bad:
        logger.warning("%s: %d invalid record(s) skipped", data, bad)
    if not out:
        raise InputError(f"{data}: no usable {spec.format} records")
    return out


def load_task(spec_path: str | Path, overrides: dict | None = None) -> Task:
    """Load a task from its TOML spec (data paths relative to the spec)."""
    spec_path = Path(spec_path)
    raw = cfgmod.load_toml(spec_path)
    raw.update(overrides or {})
    spec = cfgmod.build(TaskSpec, raw, f"task {spec_path.name}")
    base = spec_path.resolve().parent
    data = Path(spec.data) if Path(spec.data).is_absolute() else base / spec.data
    labels = (Path(spec.labels) if Path(spec.labels).is_absolute() else base / spec.labels) if spec.labels else None
    return make_task(spec, load_examples(spec, data, labels))


def make_task(spec: TaskSpec, examples: list[Any]) -> Task:
    """Split off a few-shot pool (drawn with the spec's seed) and apply the limit."""
    pool: list[Any] = []
    if spec.num_fewshot:
        rng = random.Random(spec.fewshot_seed)
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        k = min(len(examples) // 2, max(spec.num_fewshot * 4, spec.num_fewshot))
        pool = [examples[i] for i in idx[:k]]
        examples = [examples[i] for i in sorted(idx[k:])]
    if spec.limit:
        examples = examples[: spec.limit]
    return Task(spec, examples, pool)


# ---- prompts --------------------------------------------------------------------------------


def _fmt(template: str, query: str) -> str:
    return template.replace("{query}", query)


def fewshot_prefix(task: Task, i: int) -> str:
    """The description and few-shot examples placed before example i (deterministic per example)."""
    spec = task.spec
    parts = [spec.description] if spec.description else []
    if spec.num_fewshot and task.fewshot_pool:
        rng = random.Random(spec.fewshot_seed * 100003 + i)
        shots = rng.sample(task.fewshot_pool, min(spec.num_fewshot, len(task.fewshot_pool)))
        for ex in shots:
            if isinstance(ex, MCExample):
                ctx = ex.contexts[ex.gold[0]] if ex.contexts else _fmt(spec.template, ex.query)
                parts.append(ctx + spec.target_delimiter + ex.choices[ex.gold[0]])
            else:
                parts.append(_fmt(spec.template, ex.prompt) + spec.target_delimiter + ex.answers[0])
    return "".join(p + spec.fewshot_delimiter for p in parts)


def mc_pairs(task: Task, i: int) -> tuple[list[str], list[str]]:
    """(context per choice, continuation per choice) for multiple-choice example i."""
    ex: MCExample = task.examples[i]
    pre = fewshot_prefix(task, i)
    spec = task.spec
    if ex.contexts:
        return [pre + c for c in ex.contexts], [spec.target_delimiter + c for c in ex.choices]
    ctx = pre + _fmt(spec.template, ex.query)
    return [ctx] * len(ex.choices), [spec.target_delimiter + c for c in ex.choices]


def gen_prompt(task: Task, i: int) -> str:
    ex: GenExample = task.examples[i]
    return fewshot_prefix(task, i) + _fmt(task.spec.template, ex.prompt)


def write_jsonl(path: str | Path, examples: list[Any]) -> Path:
    """Write examples in the native lmforge JSONL format (atomically)."""
    from dataclasses import asdict

    from lmforge.rundir import atomic_write_text

    lines = []
    for ex in examples:
        d = asdict(ex)
        if isinstance(ex, MCExample) and ex.contexts is None:
            d.pop("contexts")
        lines.append(json.dumps(d, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")
