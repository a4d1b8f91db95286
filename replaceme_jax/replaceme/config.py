"""Default ReplaceMe run settings as an ml_collections ConfigDict (configs/*.py override these).

The entry points turn it into a validated ``replaceme_jax.settings.Settings`` before loading anything;
the fields and their ranges are documented there.
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m"       # registry name, .gguf file, HF directory or Orbax checkpoint
    c.param_dtype = "float32"
    c.dtype = "float32"            # compute dtype of the forward passes

    c.calibration = ml_collections.ConfigDict()
    # boolq | hellaswag | self (the model's own text, cached) | local file/folder | hf:<dataset name> | a mix "boolq+self"
    c.calibration.source = "boolq"
    c.calibration.num_samples = 256  # passages; None (Python) takes all
    c.calibration.max_length = 512
    c.calibration.batch_size = 8
    c.calibration.seed = 0
    c.calibration.text_column = ""
    c.calibration.messages_column = ""  # chat messages rendered with the tokenizer's chat template
    c.calibration.hf_config = ""
    c.calibration.hf_split = "train"
    c.calibration.add_bos = "auto"      # auto: only if the tokenizer itself prepends BOS
    c.calibration.include_pad = False   # True reproduces the official code (pads counted)
    c.calibration.packing = True        # several sequences per row, kept apart by the mask (fewer
                                        # positions run; ignored with include_pad)
    c.calibration.layout = "passages"   # passages: each its own sequence | stream: passages joined by a
                                        # blank line and cut into max_length rows (long-context positions)
                                        # | mixed: the first half of the passages as passages, the rest as a stream
    c.calibration.validation_fraction = 0.1  # share of the source held out (search rule's validation)
    c.calibration.validation_samples = 32    # validation passages the search rule scores cuts on

    c.num_blocks = 8                # blocks per cut (the official `layers_to_skip`)
    c.num_transforms = 1            # number of cuts (the official `num_A`)
    c.merge_consecutive = True
    c.selection = "residual"        # angular | residual | search (validation NLL of every cut)
    c.cuts = ""                     # explicit cuts, e.g. "20-28" (end exclusive); overrides selection
    c.candidates = "all"            # all: normal equations for every cut of num_blocks (residual rule,
                                    # residual table); selected: only the chosen cuts (less memory)
    c.accum_dtype = "auto"          # float64 sums except on TPU (float32 + Kahan there)

    c.solver = "lstsq"              # lstsq | diag | orth_diag | cosine | cosine_accurate | mse
    c.alpha = 0.0                   # ridge for lstsq/diag (and the cosine init)
    c.ridge_target = "zero"         # zero | identity: lstsq shrinks T toward 0 or toward I (= plain drop)
    c.alpha_grid = ""               # e.g. "0,1e-4,1e-3,1e-2": relative ridge (x tr(MᵀM)/d) chosen by the
                                    # validation residual on calibration.validation_samples passages
    c.multi_cut = "auto"            # one_pass | sequential | auto (lstsq: one_pass, cosine: sequential)
    c.budget = ml_collections.ConfigDict()
    c.budget.blocks = 0             # >0: remove this many blocks as up to max_cuts cuts (num_blocks unused)
    c.budget.max_cuts = 2
    c.budget.min_cut_blocks = 1     # shortest cut of a combination
    c.budget.proxy = "stream"       # stream | relative: per-cut cost summed over a combination
    c.budget.confirm = 4            # top combinations (+ the best single cut) scored by validation NLL
    c.refit = ml_collections.ConfigDict()  # training-free: a closed-form fit beyond T (replaceme/refit.py)
    c.refit.anchor = True           # re-fit each cut's anchor down_proj on its hidden activations (d_ff);
                                    # False: the paper's W T alone (docs/results.md, levers)
    c.refit.alpha_grid = "1e-6,1e-5,1e-4,1e-3,1e-2,3e-2,1e-1,inf"  # ridge toward W T (x tr/d_ff), chosen on the
                                    # validation passages; inf keeps ReplaceMe's W T
    c.refit.weighting = "none"      # none | token (each token by 1 / ||target||²; worse on SmolLM2's fiction)
    c.refit.downstream = 0          # blocks after each cut whose down_proj is re-fitted toward the dense stream
                                    # (closed form, ridge toward the block's own kernel on the same grid)
    c.heal = ml_collections.ConfigDict()  # optional training after pruning (off: both step counts 0)
    c.heal.anchor_steps = 0         # first: each cut's anchor block retrained toward the dense stream
    c.heal.anchor_lr = 3e-3          # 1e-2 overfits SmolLM2 (docs/results.md, anchor tuning)
    c.heal.anchor_loss = "token"    # token (every token weighs the same) | mse (LLM-Streamline's)
    c.heal.steps = 0                # then: LoRA distillation steps; resumable (state in <output_dir>.heal)
    c.heal.lr = 5e-4
    c.heal.warmup = 10
    c.heal.rank = 16                # LoRA rank; adapters are folded into W at the end
    c.heal.lora_alpha = 32.0
    c.heal.blocks = "all"           # all | adjacent (anchor + first block after each cut) | "10,11";
                                    # all: better on 3 genres from 2 starts, tasks level (docs/results.md)
    c.heal.modules = "all"          # all | e.g. "down_proj,up_proj"
    c.heal.num_samples = 2048       # passages of the healing source (training part)
    c.heal.source = ""              # healing text, any calibration.source; "" = calibration.source
    c.heal.max_length = 256
    c.heal.batch_size = 4           # packed rows per step
    c.heal.checkpoint_every = 50
    c.heal.seed = 0
    c.cosine = ml_collections.ConfigDict()
    c.cosine.init = "lstsq"         # lstsq | identity
    c.cosine.optimizer = "adam"
    c.cosine.lr = 1e-4
    c.cosine.steps = 300
    c.cosine.batch_size = 1024
    c.cosine.l1 = 0.0
    c.cosine.l2 = 0.0
    c.cosine.token_budget_mb = 512  # bound on the token buffer (uniform reservoir sample beyond it)
    c.cosine.buffer_dir = ""        # set to keep the buffer on disk (np.memmap) instead of RAM
    c.seed = 0

    c.output_dir = "runs/smollm2-135m"
    c.overwrite = False
    c.save_orbax = True
    c.export_hf = True

    c.eval = ml_collections.ConfigDict()
    c.eval.perplexity_windows = 16  # held-out Wikipedia windows for the report (0: skip)
    c.eval.window = 1024
    c.eval.compare_drop = True      # also report plain dropping of the same cuts (UIDL, no transform)
    c.evaluate = ""                 # lm-eval tasks to run at the end (e.g. "paper"); empty: none
    c.eval.limit = 0                # per-task item limit for `evaluate` (0: all)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1                 # data-parallel axis size (batches)
    c.mesh.model = 1                # model axis size (parameters: FSDP / tensor parallel)
    c.mesh.rules = "fsdp"           # fsdp | tensor: logical-axis rules (models/sharding.py)
    c.architecture = ""             # published architecture name for --dry_run without weights
    c.distributed = False           # call jax.distributed.initialize() (multi-host)
    c.progress = True
    return c


def paper_config(hub_id: str, *, num_blocks: int = 8) -> ml_collections.ConfigDict:
    """The paper's setting for a Hugging Face model: ``num_blocks`` blocks replaced by one transform,
    calibrated on 8000 SlimOrca conversations (chat template) of at most 1024 tokens in batches of 8,
    plus this project's default anchor kernel re-fit (``--config.refit.anchor=False``: the paper's
    ``W T`` alone).

    The weights are expected in ``checkpoints/<name>`` (``huggingface-cli download <hub_id>
    --local-dir checkpoints/<name>``); ``architecture`` lets ``--dry_run`` work without them. The mesh
    puts every device on the model axis with fsdp rules: ``--config.mesh.data=8 --config.mesh.model=1`` is
    plain data parallelism when a device holds the whole model, ``--config.mesh.rules=tensor`` tensor
    parallelism (see the README's scaling section). Offline, ``--config.calibration.source=hellaswag``
    uses the bundled HellaSwag contexts instead of SlimOrca.
    """
    name = hub_id.rsplit("/", 1)[-1]
    c = default_config()
    c.model = f"checkpoints/{name}"
    c.architecture = hub_id
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.num_blocks = num_blocks
    c.num_transforms = 1
    c.calibration.source = "hf:Open-Orca/SlimOrca"
    c.calibration.messages_column = "conversations"
    c.calibration.num_samples = 8000
    c.calibration.max_length = 1024
    c.calibration.batch_size = 8
    c.mesh.data = 1
    c.mesh.model = -1
    c.mesh.rules = "fsdp"
    c.output_dir = f"runs/{name.lower()}"
    return c
