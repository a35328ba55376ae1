"""Post-training: supervised fine-tuning on chat data, LoRA / QLoRA applied from outside the model,
the safety set; (next) reward models, DPO and RL. Each training stage is a batch source + a loss on
the shared trainer (lmforge.train.trainer).

Modules: `config` (`[sft]`), `sft` (`run_sft`, the stage's work), `stage` (the recipe stage "sft"),
`commands` (`lmforge sft`), `chat_data` (users' JSONL -> rendered examples -> `SFTBatches`),
`dictionary_chat` (the built-in chat set from the bundled dictionary), `safety` (refusal /
jailbreak / harmless look-alike sets, `mix`), `lora` (LoRA / QLoRA: apply, merge,
adapters). The chat template itself is `lmforge.tokenizer.chat`.
"""
