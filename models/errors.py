"""Errors raised for bad model input. Each message names the file, tensor or field that is wrong."""


class ModelError(ValueError):
  """Base class: a model file, config field or tensor is unusable."""


class UnsupportedArchitectureError(ModelError):
  """The config names an architecture (model_type / general.architecture) gravlab does not implement."""


class MissingTensorError(ModelError):
  """A tensor the architecture needs is absent from the weight files."""


class ShapeMismatchError(ModelError):
  """A tensor in the weight files has a shape other than the config implies."""


class CorruptFileError(ModelError):
  """A safetensors/GGUF file is truncated or its header is unreadable."""


class UnknownModelError(ModelError):
  """A model argument is neither a registry name, a Hugging Face directory nor a .gguf file."""
