"""Evaluation: perplexity / bits per byte per source, multiple-choice tasks scored by
log-likelihood (acc, acc_norm, by tokens, PMI), generative tasks (exact match, F1), loaders for
public benchmark files and data-quality ablations (their CLI verb lives in lmforge.plan.commands).

Public entries: `lmforge.eval.harness.evaluate` (in-process), `lmforge.eval.stage.run_stage`
(recipe stage "eval"), `lmforge.eval.ablate.run_ablation`. Hugging Face export is
`lmforge.model.hf.export_hf`; scaling-law fits are `lmforge.plan.scaling`.
"""
