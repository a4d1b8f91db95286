"""ReplaceMe on Qwen2.5-7B with the paper's settings: 8 of 28 blocks replaced by one linear
transform, calibrated on 8000 sequences of at most 1024 tokens in batches of 8 (SlimOrca
conversations rendered with the chat template).

    huggingface-cli download Qwen/Qwen2.5-7B --local-dir checkpoints/Qwen2.5-7B
    python scripts/prune.py --config=configs/qwen25_7b.py --dry_run --dry_run_backend=gpu
    python scripts/prune.py --config=configs/qwen25_7b.py

Settings and mesh: ``replaceme_jax.replaceme.config.paper_config``.
"""
from replaceme_jax.replaceme.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen2.5-7B")
