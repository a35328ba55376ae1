"""Post-training: chat data and supervised fine-tuning, the safety set, and (next) LoRA, reward
models, DPO and RL. Each stage is a batch source + a loss on the `train` trainer.

Modules: `chat_data` (users' JSONL -> rendered examples -> `SFTBatches`, and the default chat set
built from the bundled dictionary), `safety` (the refusal / jailbreak / harmless look-alike sets,
`mix`, `is_refusal`). The chat template itself is `lmforge.tokenizer.chat`.
"""
