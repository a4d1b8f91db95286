"""ReplaceMe on Llama-3-8B-Instruct with the paper's settings: 8 of 32 blocks replaced by one linear
transform, calibrated on 8000 sequences of at most 1024 tokens in batches of 8 (SlimOrca
conversations rendered with the chat template).

    huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct --local-dir checkpoints/Meta-Llama-3-8B-Instruct
    python scripts/prune.py --config=configs/llama3_8b_instruct.py --dry_run --dry_run_backend=gpu
    python scripts/prune.py --config=configs/llama3_8b_instruct.py

Offline, ``--config.calibration.source=hellaswag`` uses the bundled HellaSwag contexts instead.
The mesh puts every device on the model axis with fsdp rules (weights split, batches split);
``--config.mesh.data=8 --config.mesh.model=1`` is plain data parallelism when a device holds the
whole model, ``--config.mesh.rules=tensor`` tensor parallelism. See the README's scaling section.
"""
from replaceme_jax.replaceme.config import default_config


def get_config():
    c = default_config()
    c.model = "checkpoints/Meta-Llama-3-8B-Instruct"
    # The published architecture, for --dry_run when the checkpoint is not on this machine.
    c.architecture = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.num_blocks = 8
    c.num_transforms = 1
    c.calibration.source = "hf:Open-Orca/SlimOrca"
    c.calibration.messages_column = "conversations"
    c.calibration.num_samples = 8000
    c.calibration.max_length = 1024
    c.calibration.batch_size = 8
    c.mesh.data = 1
    c.mesh.model = -1
    c.mesh.rules = "fsdp"
    c.output_dir = "runs/meta-llama-3-8b-instruct"
    return c
