"""Evaluation: perplexity / bits per byte per source, multiple-choice tasks scored by
log-likelihood (acc, acc_norm, by tokens, PMI), generative tasks (exact match, F1), loaders for
public benchmark files.

Public entries: `lmforge.eval.harness.evaluate` (in-process), `lmforge.eval.stage.run_stage`
(recipe stage "eval"). Hugging Face export is `lmforge.model.hf.export_hf`; data-quality
ablations (`lmforge.plan.ablate`) and scaling-law fits (`lmforge.plan.scaling`) live in plan/.
"""
