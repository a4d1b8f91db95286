"""Inference speed: our KV-cache decoding vs transformers' generate, dense vs pruned.

In one process, on the same CPU and dtype (float32), for the dense model and a pruned one (default:
the main job's cut, blocks [12, 20) of SmolLM2 dropped: the same shapes as the ReplaceMe model, whose
transform is folded into an existing matrix), at batch 1 and 16, prompt --prompt_len tokens and
--new_tokens new tokens (EOS ignored): time to first token (prefill + first sample) and decode
tokens/s, ours and transformers'. Then the per-token decode cost at two context lengths (flat with a
KV cache), and the cache's bytes from the shape model next to XLA's memory_analysis() of the
compiled decode step. Every timing is warm (one untimed run first); --repeats runs, median shown.

    python scripts/bench_decode.py --output_dir=runs/bench_decode
    python scripts/bench_decode.py --pruned=runs/smollm2-135m --output_dir=...   # a real pruned model
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

from absl import flags

from replaceme_jax.cli import run_main
from replaceme_jax.errors import ReplaceMeError

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Dense model (registry name or path).")
_PRUNED = flags.DEFINE_string("pruned", None, "Pruned model path (default: --drop blocks of the dense model).")
_DROP = flags.DEFINE_string("drop", "12-20", "Blocks [start, end) dropped to build the pruned model.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_CONTEXTS = flags.DEFINE_list("contexts", ["128", "1024"], "Prompt lengths of the flat-cost rows (batch 1).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per cell (median shown).")
_TORCH = flags.DEFINE_boolean("torch", True, "Also time transformers' generate.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Directory for results.json and results.md.")
flags.mark_flags_as_required(["output_dir"])


def _median_time(fn, repeats):
    fn()  # warm: compile / allocate
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ours(gen, prompts, new):
    import jax
    ttft = _median_time(lambda: gen.generate(prompts, max_new_tokens=1, eos_token_ids=()), _REPEATS.value)
    total = _median_time(lambda: jax.block_until_ready(
        gen.generate(prompts, max_new_tokens=new, eos_token_ids=())), _REPEATS.value)
    return ttft, len(prompts) * (new - 1) / max(total - ttft, 1e-9)


def _theirs(hf, prompts, new):
    import torch
    ids = torch.tensor(prompts)

    def run(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    ttft = _median_time(lambda: run(1), _REPEATS.value)
    total = _median_time(lambda: run(new), _REPEATS.value)
    return ttft, len(prompts) * (new - 1) / max(total - ttft, 1e-9)


def _cache_memory(gen, batch, prompt_len, new):
    """(shape-model bytes, XLA argument bytes of the compiled decode step minus the parameters)."""
    import jax
    import jax.numpy as jnp
    from replaceme_jax.inference import SamplingParams
    from replaceme_jax.inference.generator import CACHE_BUCKET, _decode, _round_up
    from replaceme_jax.models.modeling import KVCache
    steps = gen.steps_per_call
    s = _round_up(_round_up(prompt_len, 64) + _round_up(new - 1, steps), CACHE_BUCKET)
    cache = jax.eval_shape(lambda: KVCache.empty(gen.config, batch, s))
    vec = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = _decode.lower(gen.graphdef, gen.state, cache, vec, vec, jax.ShapeDtypeStruct((batch,), bool),
                             jax.ShapeDtypeStruct((1,), jnp.int32),
                             (jax.random.key(0), jax.ShapeDtypeStruct((), jnp.int32)),
                             SamplingParams(), steps).compile()
    params = sum(x.nbytes for x in jax.tree.leaves(gen.state))  # the decode step also reads these
    args = compiled.memory_analysis().argument_size_in_bytes
    return KVCache.nbytes(gen.config, batch, s), args - params


def main(argv) -> int:
    if len(argv) > 1:
        raise ReplaceMeError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
    import numpy as np

    from replaceme_jax.replaceme.surgery import drop_blocks
    from replaceme_jax.checkpoints import load_pretrained
    from replaceme_jax.checkpoints.hf import save_hf
    from replaceme_jax.inference import Generator
    from replaceme_jax.models.modeling import num_parameters

    start, end = (int(x) for x in _DROP.value.split("-"))
    dense, tok = load_pretrained(_MODEL.value, dtype="float32", param_dtype="float32")
    pruned = (load_pretrained(_PRUNED.value, dtype="float32", param_dtype="float32")[0] if _PRUNED.value
              else drop_blocks(dense, range(start, end)))
    models = {"dense": dense, "pruned": pruned}
    rng = np.random.RandomState(0)
    vocab = dense.config.vocab_size
    rows, md = {}, []
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    hf_models = {}
    if _TORCH.value:
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(os.cpu_count() or 1)
        for name, m in models.items():
            save_hf(m, os.path.join(tmp, name))
            hf_models[name] = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, name),
                                                                   dtype=torch.float32).eval()
    for name, m in models.items():
        gen = Generator(m, tok, max_batch_size=max(int(b) for b in _BATCHES.value))
        for b in (int(x) for x in _BATCHES.value):
            prompts = rng.randint(3, vocab, (b, _PROMPT.value)).tolist()
            ttft, tps = _ours(gen, prompts, _NEW.value)
            cell = {"ours_ttft_s": ttft, "ours_decode_tok_s": tps}
            if name in hf_models:
                t_ttft, t_tps = _theirs(hf_models[name], prompts, _NEW.value)
                cell.update(torch_ttft_s=t_ttft, torch_decode_tok_s=t_tps)
            rows[f"{name}/b{b}"] = cell
            print(name, b, cell, flush=True)
        for ctx in (int(x) for x in _CONTEXTS.value):
            prompts = rng.randint(3, vocab, (1, ctx)).tolist()
            _, tps = _ours(gen, prompts, 33)
            rows[f"{name}/ctx{ctx}"] = {"ours_ms_per_token": 1000 / tps}
            print(name, ctx, rows[f"{name}/ctx{ctx}"], flush=True)
        b = max(int(x) for x in _BATCHES.value)
        shape_bytes, xla_bytes = _cache_memory(gen, b, _PROMPT.value, _NEW.value)
        rows[f"{name}/cache"] = {"shape_model_bytes": shape_bytes, "xla_argument_bytes_minus_params": xla_bytes,
                                 "batch": b}
        rows[f"{name}/size"] = {"blocks": m.config.num_hidden_layers, "parameters": num_parameters(m)}
    d, p = rows["dense/size"], rows["pruned/size"]
    ideal_blocks = d["blocks"] / p["blocks"]
    ideal_params = d["parameters"] / p["parameters"]
    md.append(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; float32; prompt "
              f"{_PROMPT.value}, {_NEW.value} new tokens; median of {_REPEATS.value} warm run(s).\n")
    md.append("| model | batch | ours TTFT (s) | transformers TTFT (s) | ours decode tok/s | transformers decode tok/s | ours / transformers (decode) |")
    md.append("|---|---|---|---|---|---|---|")
    for key, c in rows.items():
        if "/b" not in key:
            continue
        name, b = key.split("/b")
        t_ttft = f"{c['torch_ttft_s']:.2f}" if "torch_ttft_s" in c else "-"
        t_tps = f"{c['torch_decode_tok_s']:.1f}" if "torch_decode_tok_s" in c else "-"
        ratio = f"{c['ours_decode_tok_s'] / c['torch_decode_tok_s']:.2f}x" if "torch_decode_tok_s" in c else "-"
        md.append(f"| {name} | {b} | {c['ours_ttft_s']:.2f} | {t_ttft} | {c['ours_decode_tok_s']:.1f} | {t_tps} | {ratio} |")
    md.append("")
    md.append(f"Pruned / dense speed-up ({d['blocks']} -> {p['blocks']} blocks; ideal by blocks "
              f"{ideal_blocks:.2f}x, by parameters {ideal_params:.2f}x):\n")
    md.append("| batch | TTFT speed-up | decode speed-up |")
    md.append("|---|---|---|")
    for b in _BATCHES.value:
        dc, pc = rows[f"dense/b{b}"], rows[f"pruned/b{b}"]
        md.append(f"| {b} | {dc['ours_ttft_s'] / pc['ours_ttft_s']:.2f}x | "
                  f"{pc['ours_decode_tok_s'] / dc['ours_decode_tok_s']:.2f}x |")
    md.append("")
    md.append("| model | context | decode ms/token (batch 1) |")
    md.append("|---|---|---|")
    for key, c in rows.items():
        if "/ctx" in key:
            name, ctx = key.split("/ctx")
            md.append(f"| {name} | {ctx} | {c['ours_ms_per_token']:.1f} |")
    md.append("")
    md.append("| model | KV cache, shape model | XLA decode-step arguments minus parameters |")
    md.append("|---|---|---|")
    for name in models:
        c = rows[f"{name}/cache"]
        md.append(f"| {name} (batch {c['batch']}) | {c['shape_model_bytes'] / 2**20:.1f} MiB | "
                  f"{c['xla_argument_bytes_minus_params'] / 2**20:.1f} MiB |")
    os.makedirs(_OUTPUT.value, exist_ok=True)
    with open(os.path.join(_OUTPUT.value, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(_OUTPUT.value, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    run_main(main)
