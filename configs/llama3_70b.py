"""ReplaceMe on Llama-3-70B with the paper's settings: 20 of 80 blocks replaced by one linear
transform, calibrated on 8000 sequences of at most 1024 tokens in batches of 8 (SlimOrca
conversations rendered with the chat template).

    huggingface-cli download meta-llama/Meta-Llama-3-70B --local-dir checkpoints/Meta-Llama-3-70B
    python scripts/prune.py --config=configs/llama3_70b.py --dry_run --dry_run_backend=gpu
    python scripts/prune.py --config=configs/llama3_70b.py
    # multi-host (TPU VM slice or several GPU hosts): the same command on every host
    python scripts/prune.py --config=configs/llama3_70b.py --config.distributed=True

Settings and mesh: ``replaceme_jax.replaceme.config.paper_config``.
"""
from replaceme_jax.replaceme.config import paper_config


def get_config():
    c = paper_config("meta-llama/Meta-Llama-3-70B", num_blocks=20)
    # Normal equations for all 60 candidate cuts are 120 d x d float64 sums (60 GiB, twice that with
    # the Kahan terms, and a whole copy of a batch's partial sums on every device): select by angular
    # distance (the paper's rule) and gather only the chosen cut's (see --dry_run).
    c.selection = "angular"
    c.candidates = "selected"
    return c
