"""gravlab model code: configs, parameter layout, loaders, the Llama/Qwen forward pass and generation."""
