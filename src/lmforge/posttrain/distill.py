"""Knowledge distillation: `run_distill(cfg, teacher, out_dir, student=... | student_preset=...)`.

A student (a fresh model from a preset, smaller than the teacher, or an existing checkpoint: a
pruned or low-rank model from `lmforge prune` / `lmforge lowrank`, the recovery fine-tuning path)
is trained on the teacher's soft targets, mixed with the hard next-token labels (Hinton et al.
2015). A fresh student may start from the teacher's embedding, head and evenly spaced layers
(`student_init = "teacher"`, as DistilBERT does) when it has the teacher's width:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

averaged over the target tokens; the T^2 factor keeps the soft term's gradient scale independent
of the temperature. Both models share the tokenizer (checked). The full-vocabulary KL needs the
logits of both models: they are formed one block of `chunk_rows` rows at a time from the final
hidden states (`Transformer.hidden_states`), and each block's student part runs under activation
checkpointing, so at most one block of (rows x vocab) logits is alive in the forward and in the
backward, never the whole (tokens x vocab) tensors.

Distillation is a batch source (token windows of the teacher run's train shards, a `--tokens`
directory, or text files tokenized with the teacher's tokenizer) + this loss on the shared
trainer (lmforge.train.trainer): checksummed `step_N/` checkpoints + `latest` in `out_dir`,
bit-exact resume, metrics.jsonl (loss, kl, ce, and the student's held-out bits per byte at
every eval), loss.png. The output is a normal checkpoint (`lmforge generate`, eval, and later a
draft model for speculative decoding). A magnitude-pruned student keeps its zeros
(`keep_sparsity`): its pruned layers run as `MaskedLinear` (weight * mask in the forward, so the
pruned weights get no gradient), and the saved weights are masked. A low-rank student keeps its
factorised layers; state.json records their ranks as `lmforge lowrank` does.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig, check_trainer_fields

BUNDLED_DICTIONARY = Path(__file__).resolve().parents[1] / "sample" / "dictionary" / "gcide-sample.jsonl.gz"


@dataclass
class DistillConfig(TrainerConfig):
    temperature: float = 2.0  # softmax temperature of the soft targets
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha on the hard-label cross-entropy
    seq_len: int = 0  # tokens per row (0 = the smaller of the two contexts, at most 256)
    batch_size: int = 8
    chunk_rows: int = 1024  # rows of (rows x vocab) logits formed at a time for the KL
    keep_sparsity: bool = True  # a magnitude-pruned student keeps its zeros
    heldout_sequences: int = 8  # held-out windows the student's bits per byte is measured on
    # a fresh (preset) student: "random" initialisation, or "teacher": the teacher's embedding,
    # head and evenly spaced layers copied in (same width needed)
    student_init: Literal["random", "teacher"] = "random"
    # trainer defaults for distillation (keys as in [pretrain]); a fresh student takes the
    # pretraining defaults instead (muon) unless these are given
    max_steps: int = 200
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("heldout_sequences", "chunk_rows")

    def validate(self) -> None:
        check_trainer_fields(self, "distill")
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.seq_len < 0 or self.batch_size < 1 or self.chunk_rows < 1:
            raise ConfigError(f"distill.seq_len ({self.seq_len}) must be >= 0, batch_size ({self.batch_size}) and "
                              f"chunk_rows ({self.chunk_rows}) >= 1")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


@dataclass
class DistillResult:
    out_dir: Path
    steps: int = 0
    final_loss: float | None = None
    checkpoint: Path | None = None
    teacher: str = ""
    student: str = ""
    teacher_params: int = 0
    student_params: int = 0
    teacher_bpb: float | None = None
    student_bpb_before: float | None = None
    student_bpb: float | None = None
    data: str = ""
    tokens_per_s: float | None = None
    wall_time_s: float = 0.0
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)


# ---- the loss ------------------------------------------------------------------------------------


def _chunk_terms(sh: torch.Tensor, th: torch.Tensor, y: torch.Tensor, s_head: nn.Module, t_head: nn.Module,
                 temperature: float) -> torch.Tensor:
    """(2,) = [sum of KL(p_t^T || p_s^T), sum of CE] over one block of rows (targets -100 left out)."""
    zs = s_head(sh).float()
    with torch.no_grad():
        log_pt = (t_head(th).float() / temperature).log_softmax(-1)
    valid = y != -100
    log_ps = (zs / temperature).log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce = F.cross_entropy(zs, torch.where(valid, y, 0), reduction="none")
    return torch.stack([(kl * valid).sum(), (ce * valid).sum()])


def kd_terms(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, targets: torch.Tensor, s_head: nn.Module,
             t_head: nn.Module, temperature: float, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean KL at `temperature`, mean cross-entropy) of the student's next-token distribution
    against the teacher's and the labels, from final hidden states (..., d), block by block:
    each block of `chunk_rows` rows is checkpointed, so its logits are recomputed in the backward
    instead of being kept (module docstring)."""
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    y = targets.reshape(-1)
    n = (y != -100).sum().clamp(min=1)
    total = None
    for s in range(0, sh.shape[0], chunk_rows):
        args = (sh[s : s + chunk_rows], th[s : s + chunk_rows], y[s : s + chunk_rows], s_head, t_head, temperature)
        part = (torch.utils.checkpoint.checkpoint(_chunk_terms, *args, use_reentrant=False)
                if torch.is_grad_enabled() and sh.requires_grad else _chunk_terms(*args))
        total = part if total is None else total + part
    return total[0] / n, total[1] / n


def distill_objective(kl: torch.Tensor, ce: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def make_loss(teacher, temperature: float, alpha: float, chunk_rows: int):
    """The trainer's loss_fn(student, batch) -> (loss, {"kl", "ce"}) for a frozen `teacher`."""

    def distill_loss(student, batch):
        if not hasattr(student, "hidden_states"):
            raise ConfigError("distill: the student must be a plain lmforge Transformer (data-parallel wrappers are not supported)")
        if alpha == 0.0:  # hard labels only (the no-teacher baseline): the fused loss, no teacher pass
            _, loss = student(batch.x, batch.y, doc_ids=batch.doc_ids)
            return loss, {"kl": torch.zeros((), device=loss.device), "ce": loss.detach()}
        with torch.no_grad():
            th = teacher.hidden_states(batch.x, batch.doc_ids)
        sh = student.hidden_states(batch.x, batch.doc_ids)
        kl, ce = kd_terms(sh, th, batch.y, student.lm_head, teacher.lm_head, temperature, chunk_rows)
        loss = distill_objective(kl, ce, temperature, alpha)
        if student.cfg.moe_experts:
            loss = loss + student.cfg.moe_aux_loss_coef * student.aux_loss()
        return loss, {"kl": kl.detach(), "ce": ce.detach()}

    return distill_loss


# ---- sparsity-keeping student ---------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """nn.Linear whose forward uses weight * mask (mask a non-persistent buffer, so the state dict
    is a plain linear layer's): pruned weights stay out of the output and get no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def mask_pruned(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Swap the named linear layers for `MaskedLinear` with mask = (weight != 0); {name: mask}."""
    masks = {}
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"the student's state.json lists pruned module {name}, which it does not have") from None
        if type(lin) is not nn.Linear:
            continue
        m = MaskedLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                         dtype=lin.weight.dtype)
        m.weight = lin.weight
        if lin.bias is not None:
            m.bias = lin.bias
        m.register_buffer("mask", (lin.weight.detach() != 0).to(lin.weight.dtype), persistent=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m)
        masks[name] = m.mask
    return masks


# ---- data ----------------------------------------------------------------------------------------


class ArrayStream:
    """An in-memory token stream with TokenStream's interface (split, total, read)."""

    def __init__(self, tokens: np.ndarray, split: str = "train"):
        self.tokens, self.split, self.total = tokens, split, int(len(tokens))

    def read(self, start: int, n: int) -> np.ndarray:
        return self.tokens[start : start + n].astype(np.int64)

    def max_token(self) -> int:
        return int(self.tokens.max()) if self.total else -1


def _read_texts(path: Path) -> list[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        if name.endswith(".gz"):
            fh = gzip.open(path, "rt", encoding="utf-8")
        elif name.endswith(".zst"):
            import io

            import zstandard

            fh = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
        else:
            fh = open(path, encoding="utf-8")
        out, bad = [], 0
        with fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    t = json.loads(line).get("text")
                except (ValueError, AttributeError):
                    t = None
                if isinstance(t, str) and t.strip():
                    out.append(t)
                else:
                    bad += 1
        if bad:
            logger.warning("distill: %s: %d lines without a \"text\" string skipped", path, bad)
        return out
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text (give .txt, .jsonl, .jsonl.gz or .jsonl.zst files)") from None
    return [p for p in text.split("\n\n") if p.strip()]


def text_stream(paths: list[Path], tok) -> tuple[ArrayStream, str]:
    """The documents of text files (.txt: paragraphs; .jsonl[.gz|.zst]: "text" fields) tokenized
    with `tok`, each after a <|bos|>, as one token stream."""
    ids: list[int] = []
    ndocs = 0
    for p in paths:
        if not p.is_file():
            raise InputError(f"--data {p}: no such file")
        texts = _read_texts(p)
        for t in texts:
            ids += ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(t)
        ndocs += len(texts)
    if not ids:
        raise InputError(f"--data: no text in {', '.join(str(p) for p in paths)}")
    return ArrayStream(np.asarray(ids, dtype=np.int64)), f"{ndocs} documents from {', '.join(str(p) for p in paths)}"


def find_run_tokens(model_dir: Path) -> Path | None:
    for d in [model_dir.resolve(), *model_dir.resolve().parents][:6]:
        if (d / "tokens" / "index.json").is_file():
            return d / "tokens"
    return None


def training_stream(tok, teacher_dir: Path, tokens: str | Path | None, data: list[str | Path]):
    """(stream, description): `tokens` (a tokens/ directory's train split), `data` text files, the
    teacher run's tokens/, or the bundled sample dictionary's documents (not the held-out ones)."""
    from lmforge.train.data import TokenStream, read_index

    if tokens and data:
        raise ConfigError("give --tokens or --data, not both")
    if data:
        return text_stream([Path(p) for p in data], tok)
    root = Path(tokens) if tokens else find_run_tokens(teacher_dir)
    if root is not None:
        stream = TokenStream(read_index(root), "train")
        if stream.total == 0:
            raise InputError(f"{root}: the train split holds no tokens")
        return stream, f"train tokens of {root}"
    import xxhash

    with gzip.open(BUNDLED_DICTIONARY, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    # leave out the documents eval (and the held-out report) hold out: lmforge.eval.builtin.is_heldout
    texts = [r["text"] for r in rows if r.get("text", "").strip() and xxhash.xxh64_intdigest(str(r["id"]).encode()) % 1000 < 950]
    ids: list[int] = []
    for t in texts:
        ids += ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(t)
    return ArrayStream(np.asarray(ids, dtype=np.int64)), f"bundled sample dictionary ({len(texts)} documents)"


# ---- models --------------------------------------------------------------------------------------


def same_tokenizer(a, b) -> bool:
    if a.vocab_size != b.vocab_size or (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        return False
    probe = "Distillation needs one tokenizer: déjà vu, 12345, def f(x): return x ** 2\n"
    return a.encode(probe) == b.encode(probe)


def build_student(preset_name: str, teacher_cfg, overrides: dict, seed: int, device):
    """A fresh Transformer from `preset_name` with the teacher's vocabulary and context."""
    from lmforge.model.config import PRESETS, ModelConfig
    from lmforge.model.transformer import Transformer

    if preset_name not in PRESETS:
        raise ConfigError(f"--student-preset {preset_name!r}: presets are {', '.join(PRESETS)}")
    fields = set(ModelConfig.__dataclass_fields__)
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ConfigError(f"--student-set: unknown model field {bad[0]!r}; fields: {', '.join(sorted(fields))}")
    base = dict(PRESETS[preset_name])
    if "d_model" in overrides and "ffn_hidden" not in overrides:
        base.pop("ffn_hidden", None)
    spec = {**base, "vocab_size": teacher_cfg.vocab_size, "max_seq_len": teacher_cfg.max_seq_len, **overrides}
    try:
        cfg = ModelConfig(**spec)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"student model: {e}") from None
    if cfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(f"the student's vocab_size ({cfg.vocab_size}) must be the teacher's ({teacher_cfg.vocab_size})")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    return model


def teacher_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers a student of `n_student` layers starts from: evenly spaced, first and last
    included (the last one feeds the output head)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


@torch.no_grad()
def init_from_teacher(student, teacher) -> list[int]:
    """Copy the teacher's embedding, final norm, output head and evenly spaced layers
    (`teacher_layers`) into a fresh student of the same width (DistilBERT's initialisation);
    returns the teacher layers used. ConfigError when the shapes differ."""
    from lmforge.infer.compress import check_plain

    check_plain(teacher, "--student-init teacher")
    sc, tc = student.cfg, teacher.cfg
    same = ("d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "qk_norm", "moe_experts", "tie_embeddings")
    diff = [k for k in same if getattr(sc, k) != getattr(tc, k)]
    if diff:
        raise ConfigError(f"--student-init teacher needs the teacher's layer shape; the student differs in {', '.join(diff)}")
    if sc.n_layers > tc.n_layers:
        raise ConfigError(f"--student-init teacher: the student has more layers ({sc.n_layers}) than the teacher ({tc.n_layers})")
    idx = teacher_layers(tc.n_layers, sc.n_layers)
    student.tok_emb.weight.copy_(teacher.tok_emb.weight)
    student.norm.load_state_dict(teacher.norm.state_dict())
    if not sc.tie_embeddings:
        student.lm_head.weight.copy_(teacher.lm_head.weight)
    for i, j in enumerate(idx):
        student.layers[i].load_state_dict(teacher.layers[j].state_dict())
    return idx


def heldout_bpb(model, seqs, nbytes) -> float:
    from lmforge.infer.quantize_cmd import heldout_metrics

    was = model.training
    model.eval()
    try:
        return heldout_metrics(model, seqs, nbytes)["bpb"]
    finally:
        model.train(was)


def run_distill(cfg: DistillConfig, teacher: str | Path, out_dir: str | Path, *, student: str | Path | None = None,
                student_preset: str | None = None, student_overrides: dict | None = None, tokens: str | Path | None = None,
                data: list | None = None, seed: int = 1234, tokenizer: str | Path | None = None) -> DistillResult:
    """Distill `teacher` into a student (`student`: an existing model, e.g. a pruned one; or
    `student_preset` + `student_overrides`: a fresh one) in `out_dir`; resumes from the newest
    intact checkpoint there (cfg.resume)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.infer.compress import count_parameters, lowrank_map
    from lmforge.infer.quantize_cmd import heldout_sequences
    from lmforge.rundir import read_json
    from lmforge.tokenizer.runtime import tokenizer_file

    t0 = time.time()
    if (student is None) == (student_preset is None):
        raise ConfigError("lmforge distill: give --student MODEL or --student-preset NAME (one of them)")
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "distill")
    if runtime.info.distributed:
        raise ConfigError("distill runs on one process (data parallelism is not supported for distillation yet)")
    teacher_model, tok, tref = load_model_and_tokenizer(teacher, device=runtime.device, tokenizer=tokenizer)
    teacher_model.eval().requires_grad_(False)
    compression, masks = None, {}
    if student is not None:
        smodel, stok, sref = load_model_and_tokenizer(student, device=runtime.device)
        if not same_tokenizer(tok, stok):
            raise InputError(f"student {sref.path} and teacher {tref.path} do not share a tokenizer: distillation needs one")
        smodel.float()
        sstate = read_json(sref.path / "state.json", {}) or {}
        compression = sstate.get("compression") if isinstance(sstate.get("compression"), dict) else None
        if compression and compression.get("method") == "magnitude" and cfg.keep_sparsity:
            masks = mask_pruned(smodel, list(compression.get("modules") or []))
        student_desc = str(sref.path)
    else:
        smodel = build_student(student_preset, teacher_model.cfg, student_overrides or {}, seed, runtime.device)
        student_desc = f"preset {student_preset}" + (f" {student_overrides}" if student_overrides else "")
        if cfg.student_init == "teacher":
            student_desc += f", initialised from teacher layers {init_from_teacher(smodel, teacher_model)}"
    if smodel.cfg.vocab_size != teacher_model.cfg.vocab_size:
        raise InputError(f"the student's vocabulary ({smodel.cfg.vocab_size}) differs from the teacher's "
                         f"({teacher_model.cfg.vocab_size})")
    ctx = min(smodel.cfg.max_seq_len, teacher_model.cfg.max_seq_len)
    seq_len = cfg.seq_len or min(ctx, 256)
    if seq_len > ctx:
        raise ConfigError(f"distill.seq_len = {seq_len} is longer than the models' context ({ctx})")
    stream, data_desc = training_stream(tok, tref.path, tokens, data or [])
    top = stream.max_token()
    if top >= smodel.cfg.vocab_size:
        raise InputError(f"the training tokens hold id {top}, outside the models' vocabulary ({smodel.cfg.vocab_size}): "
                         "they were made with another tokenizer")
    from lmforge.train.data import BatchLoader

    batches = BatchLoader(stream, seq_len, cfg.batch_size, seed=seed, bos_id=tok.bos_id if tok.bos_id is not None else -1,
                          packing="doc_mask", device=runtime.device)
    source, seqs, nbytes = heldout_sequences(tref.path, tok, ctx, n=cfg.heldout_sequences)
    teacher_bpb = heldout_bpb(teacher_model, seqs, nbytes) if seqs else None
    before = heldout_bpb(smodel, seqs, nbytes) if seqs else None
    logger.info("distill: teacher %s (%d params, held-out bpb %s) -> student %s (%d params, bpb %s); data: %s",
                tref.path, count_parameters(teacher_model)[0], teacher_bpb, student_desc, count_parameters(smodel)[0], before,
                data_desc)
    smodel.train()
    history: list[dict] = []

    def evaluate(ts):
        if not seqs:
            return {}
        rec = {"heldout_bpb": heldout_bpb(ts.model, seqs, nbytes)}
        history.append({"step": ts.step, **rec})
        return rec

    ranks = lowrank_map(smodel)
    extra_state = {"stage": "distill", "teacher": str(tref.path.resolve()), "student": student_desc,
                   "distill": {"temperature": cfg.temperature, "alpha": cfg.alpha}}
    if compression:
        extra_state["compression"] = compression
    if ranks:
        extra_state["lowrank"] = {"ranks": ranks}
    hooks: dict = {}
    if masks:
        def export(sd):
            return {k: (v * masks[k[: -len(".weight")]].to(v.dtype) if k.endswith(".weight") and k[: -len(".weight")] in masks
                        else v) for k, v in sd.items()}

        hooks["export_weights"] = export

    fp = {"data": data_desc, "tokens": stream.total, "teacher": str(tref.path.resolve()), "student": student_desc}
    res = T.fit(
        tcfg, runtime, smodel, batches, make_loss(teacher_model, cfg.temperature, cfg.alpha, cfg.chunk_rows), out_dir,
        name="distill", run_config={**cfgmod.to_dict(cfg), "seq_len": seq_len, **fp},
        resume_free=DistillConfig.RESUME_FREE, model_config=smodel.cfg.to_dict(), tokenizer_file=tokenizer_file(tok.path),
        tokens_per_step=cfg.batch_size * seq_len * tcfg.grad_accum,
        flops_per_token=smodel.cfg.flops_per_token(seq_len) + teacher_model.cfg.flops_per_token(seq_len) / 3,
        evaluate=evaluate if seqs else None, extra_state=extra_state, data_desc=data_desc, plot_title="distillation loss",
        **hooks,
    )
    after = heldout_bpb(smodel, seqs, nbytes) if seqs else None
    return DistillResult(
        out_dir=out_dir, steps=res.steps, final_loss=res.final_loss, checkpoint=res.checkpoint, teacher=str(tref.path),
        student=student_desc, teacher_params=count_parameters(teacher_model)[0], student_params=count_parameters(smodel)[0],
        teacher_bpb=teacher_bpb, student_bpb_before=before, student_bpb=after, data=data_desc,
        tokens_per_s=res.tokens_per_s, wall_time_s=time.time() - t0, resumed_from=res.resumed_from, history=history)


__all__ = ["DistillConfig", "DistillResult", "MaskedLinear", "distill_objective", "init_from_teacher", "kd_terms", "make_loss",
           "mask_pruned",
           "run_distill", "same_tokenizer", "text_stream", "training_stream"]
