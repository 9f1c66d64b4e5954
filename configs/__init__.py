"""ml_collections configs of the entry points (`--config=configs/<entry>.py:<preset>`)."""

# Preset model name -> models.registry name of the embedded model (models/registry.py).
MODELS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}
