"""ml_collections configs of the entry points (`--config=configs/<entry>.py:<preset>`)."""

# Preset model name -> models.registry name of the embedded model (models/registry.py).
MODELS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}


def preset(kind: str, arg: str, base, modifiers: dict):
  """`base()` with the preset's modifier applied (None = the base itself): the one preset pattern of configs/.
  Raises ValueError naming the known presets for an unknown `arg`."""
  if arg not in modifiers:
    raise ValueError(f"unknown {kind} config {arg!r}; choose from {', '.join(modifiers)}")
  c = base()
  if modifiers[arg] is not None:
    modifiers[arg](c)
  return c
