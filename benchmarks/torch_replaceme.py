"""ReplaceMe (least squares) run the way the official PyTorch code runs it: the benchmark's baseline.

Written after the mechanics of mts-ai/ReplaceMe (not its code), on a transformers model in float32:

1. distance pass: the full model (every block and the LM head) with ``output_hidden_states=True``;
   each row's last real token is taken at every layer and the angular distance between h_s and
   h_{s+n} is averaged per batch, then over batches;
2. the cut with the smallest distance is chosen;
3. normal-equation pass: the full model again, with a forward hook on every block's MLP; for the
   chosen cut the anchor's MLP output M and the target L_{e-1} - Y_a (Y_a = L_a - M_a) are cast to
   float64 on the host, where MᵀM and Mᵀ(L - Y) are accumulated;
4. T solves the normal equations in float64, the blocks are dropped and T is folded into the
   anchor's down_proj.

Batches are consecutive texts padded to the longest one (the official DataLoader with tokenizer
``padding="longest"``, right padding); pad positions count in the sums (``include_pad=True``) as in
the official code. Like transformers, ``hidden_states[-1]`` is the final-normed output, so a cut
ending at the last block is measured against it, as the official code does. Two deliberate
differences, both in the baseline's favour: the sums are streamed instead of concatenating every
token's activations, and the surgery edits the loaded model instead of reloading it.
Cut indices follow this project: cut [s, e) removes blocks s..e-1, anchor a = s - 1, and its
distance compares h_s (input of block s; h_0 = embeddings) with h_e.
Used only for comparison; nothing in replaceme_jax imports it.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from replaceme_jax.replaceme.pipeline import Timer  # stage timing shared with our side

Cut = tuple[int, int]


@dataclasses.dataclass
class TorchBatch:
    input_ids: torch.Tensor       # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


@dataclasses.dataclass
class BaselineResult:
    cut: Cut
    T: np.ndarray                 # float64 [d, d]
    distances: np.ndarray         # [num_blocks + 1 - n]: mean angular distance of cut [s, s + n)
    mtm: np.ndarray
    mtr: np.ndarray
    num_tokens: int               # rows in the sums (pads included when include_pad)
    times: dict[str, float]
    model: torch.nn.Module        # the pruned model


def set_threads(threads: int | None = None) -> int:
    """Torch intra-op threads: all of the machine's cores unless told otherwise."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def load_model(hf_dir, threads: int | None = None):
    """transformers' causal LM from a Hugging Face directory, float32, eval mode."""
    import transformers
    set_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.eval()


def tokenize_batches(tokenizer, texts, batch_size: int, max_length: int) -> list[TorchBatch]:
    """The official data path: consecutive texts, tokenised per batch with ``padding="longest"``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding="longest",
                        max_length=max_length, truncation=True)
        batches.append(TorchBatch(enc["input_ids"], enc["attention_mask"]))
    return batches


def official_batches(token_lists, batch_size: int, pad_id: int) -> list[TorchBatch]:
    """Consecutive sequences, ``batch_size`` at a time, right-padded to the longest in the batch."""
    batches = []
    for start in range(0, len(token_lists), batch_size):
        group = [np.asarray(s, np.int64) for s in token_lists[start:start + batch_size]]
        t = max(len(s) for s in group)
        ids = np.full((len(group), t), pad_id, np.int64)
        mask = np.zeros((len(group), t), np.int64)
        for row, s in enumerate(group):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        batches.append(TorchBatch(torch.from_numpy(ids), torch.from_numpy(mask)))
    return batches


def _angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / torch.norm(a, dim=-1, keepdim=True)
    b = b / torch.norm(b, dim=-1, keepdim=True)
    return torch.acos((a * b).sum(-1).clamp(-1, 1)) / torch.pi


@torch.inference_mode()
def angular_distances(model, batches, n: int) -> np.ndarray:
    """Pass 1: mean angular distance between h_s and h_{s+n} on each row's last real token."""
    per_batch = []
    for batch in batches:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        mask = batch.attention_mask
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # last real token of each row
        rows = torch.arange(mask.shape[0], device=mask.device)
        lasts = [h[rows, last] for h in out.hidden_states]  # num_blocks + 1 tensors [B, d]
        per_batch.append([_angular(lasts[s], lasts[s + n]).mean().item() for s in range(len(lasts) - n)])
    return np.asarray(per_batch).mean(0)


def select_cut(distances: np.ndarray, n: int) -> Cut:
    """The cut [s, s + n) with the smallest distance; s = 0 has no anchor block and is skipped."""
    s = 1 + int(np.argmin(distances[1:]))
    return (s, s + n)


@torch.inference_mode()
def normal_equations(model, batches, cut: Cut, *, include_pad: bool = True):
    """Pass 2: (MᵀM, Mᵀ(L_{e-1} - Y_a), rows) in float64 on the host, from MLP hooks + hidden states."""
    s, e = cut
    a = s - 1
    d = model.config.hidden_size
    captured = {}

    def keep(index):
        def hook(module, inputs, output):
            captured[index] = output.detach()
        return hook

    hooks = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    mtm = torch.zeros(d, d, dtype=torch.float64)
    mtr = torch.zeros(d, d, dtype=torch.float64)
    rows = 0
    try:
        for batch in batches:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[1:]  # block outputs L_0 .. L_{num_blocks-1}
            m = captured[a].reshape(-1, d).to("cpu", torch.float64)
            y = hidden[a].reshape(-1, d).to("cpu", torch.float64) - m
            r = hidden[e - 1].reshape(-1, d).to("cpu", torch.float64) - y
            if not include_pad:
                real = batch.attention_mask.reshape(-1).bool().cpu()
                m, r = m[real], r[real]
            mtm += m.T @ m
            mtr += m.T @ r
            rows += m.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return mtm.numpy(), mtr.numpy(), rows


def solve(mtm: np.ndarray, mtr: np.ndarray) -> np.ndarray:
    """T = (MᵀM)⁻¹ Mᵀ(L - Y) in float64."""
    return torch.linalg.solve(torch.from_numpy(mtm), torch.from_numpy(mtr)).numpy()


@torch.no_grad()
def apply_cut(model, cut: Cut, T: np.ndarray):
    """Drop blocks [s, e) and fold T into the anchor's down_proj (weight [d, d_ff] <- Tᵀ weight)."""
    s, e = cut
    down = model.model.layers[s - 1].mlp.down_proj
    T = torch.from_numpy(T).to(down.weight.device, torch.float64)
    down.weight.copy_((T.T @ down.weight.to(torch.float64)).to(down.weight.dtype))
    kept = [layer for i, layer in enumerate(model.model.layers) if not s <= i < e]
    for i, layer in enumerate(kept):  # cache slots are indexed by position (a reload renumbers them)
        layer.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers -= e - s
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if not s <= i < e]
    return model


def run(model, batches, n: int, *, cut: Cut | None = None, include_pad: bool = True,
        timer: Timer | None = None) -> BaselineResult:
    """The whole baseline on a loaded model: distances, selection, normal equations, solve, surgery.

    The distance pass always runs, as in the official code; ``cut`` only overrides the cut it
    selects, so both sides can be compared on the same cut.
    """
    timer = timer or Timer()
    with timer("distances"):
        distances = angular_distances(model, batches, n)
    with timer("selection"):
        chosen = cut or select_cut(distances, n)
    with timer("normal_equations"):
        mtm, mtr, rows = normal_equations(model, batches, chosen, include_pad=include_pad)
    with timer("solve"):
        T = solve(mtm, mtr)
    with timer("surgery"):
        model = apply_cut(model, chosen, T)
    return BaselineResult(cut=chosen, T=T, distances=distances, mtm=mtm, mtr=mtr, num_tokens=rows,
                          times=timer.times, model=model)
