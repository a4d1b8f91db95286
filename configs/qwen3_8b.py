"""ReplaceMe on Qwen3-8B with the paper's settings: 8 of 36 blocks replaced by one linear
transform, calibrated on 8000 sequences of at most 1024 tokens in batches of 8 (SlimOrca
conversations rendered with the chat template).

    huggingface-cli download Qwen/Qwen3-8B --local-dir checkpoints/Qwen3-8B
    python scripts/prune.py --config=configs/qwen3_8b.py --dry_run --dry_run_backend=gpu
    python scripts/prune.py --config=configs/qwen3_8b.py

Settings and mesh: ``replaceme_jax.replaceme.config.paper_config``.
"""
from replaceme_jax.replaceme.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen3-8B")
