"""Evaluation: perplexity / bits per byte per source, multiple-choice tasks scored by
log-likelihood (acc, acc_norm, by tokens, PMI), generative tasks (exact match, F1), loaders for
public benchmark files, Hugging Face export, data-quality ablations and scaling-law fits.

Public entries: `lmforge.eval.harness.evaluate` (in-process), `lmforge.eval.stage.run_stage`
(recipe stage "eval"), `lmforge.eval.export_hf.export_hf`, `lmforge.eval.ablate.run_ablation`,
`lmforge.plan.scaling` (fits).
"""
