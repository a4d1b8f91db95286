"""ReplaceMe on Llama-3.1-8B with the paper's settings: 8 of 32 blocks replaced by one linear
transform, calibrated on 8000 sequences of at most 1024 tokens in batches of 8 (SlimOrca
conversations rendered with the chat template).

    huggingface-cli download meta-llama/Llama-3.1-8B --local-dir checkpoints/Llama-3.1-8B
    python scripts/prune.py --config=configs/llama31_8b.py --dry_run --dry_run_backend=gpu
    python scripts/prune.py --config=configs/llama31_8b.py

Settings and mesh: ``replaceme_jax.replaceme.config.paper_config``.
"""
from replaceme_jax.replaceme.config import paper_config


def get_config():
    return paper_config("meta-llama/Llama-3.1-8B")
