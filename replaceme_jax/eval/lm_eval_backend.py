"""lm-evaluation-harness backend for our Flax ``CausalLM``, registered as ``replaceme-jax``.

Request handling mirrors the harness's own Hugging Face backend (``--model hf``) so the two give
the same numbers on the same checkpoint: the same context/continuation tokenisation (inherited
from ``TemplateLM``), the same left truncation to ``max_length + 1`` tokens, the same rolling
windows for ``loglikelihood_rolling``, and greedy ``generate_until`` with the same stop handling (KV-cache decoding, ``inference.Generator``).
What differs is execution (see ``scoring.TokenScorer``): the context of a multiple-choice item
runs once with every answer attending to it, several items share a row, the LM head runs only
where a token is scored, and rows come in a few widths so ``jax.jit`` compiles a bounded number of
shapes. With ``cache_dir`` every finished request is kept on disk, so an interrupted run resumes.

Python::

    lm = ReplaceMeJaxLM(model=model, tokenizer=tokenizer)          # in-process, e.g. a pruned model
    lm_eval.simple_evaluate(model=lm, tasks=["rmj_piqa"], task_manager=task_manager())

Command line (the harness's own CLI, with this backend registered and our task YAMLs included)::

    python -m replaceme_jax.eval.lm_eval_backend run --model replaceme-jax \\
        --model_args pretrained=smollm2-135m --tasks rmj_piqa,rmj_arc_easy --limit 20
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.eval.request_cache import RequestCache, model_fingerprint, request_key
from replaceme_jax.eval.scoring import TokenScorer
from replaceme_jax.inference import Generator

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_TOKENS = 4096
GENERATE_CHUNK_STEPS = 16  # decode steps per jitted call between host-side stop checks


@register_model("replaceme-jax", "replaceme_jax")
class ReplaceMeJaxLM(TemplateLM):
    """Our ``CausalLM`` behind the harness's ``LM`` interface.

    Args:
      pretrained: registry name or path (HF directory, .gguf, Orbax) when ``model`` is not given.
      model, tokenizer: an in-process model and its Hugging Face tokenizer (e.g. a pruned model).
      max_length: context window in tokens (default: the config's max_position_embeddings, as the
        HF backend resolves it).
      batch_size: rows per batch cap (the harness passes its --batch_size; "auto" means default).
      max_batch_tokens: rows x padded length per batch (bounds the float32 logits in memory).
      max_gen_toks: default generation budget for generate_until.
      add_bos_token: force (True) or suppress (False) the tokenizer's special tokens; None keeps
        the tokenizer's default, as the HF backend does.
      dtype, param_dtype: compute / parameter dtype when loading ``pretrained``.
      cache_dir: directory of the per-request result cache (see ``request_cache``): requests
        scored before by the same model are read back, new ones are added as they finish, so an
        interrupted evaluation resumes. None: no cache.
      device: accepted because the harness always passes it; JAX uses its default device.
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 max_length: int | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 dtype: str | None = None, param_dtype: str | None = None, cache_dir: str | None = None,
                 device: str | None = None):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ReplaceMeError("replaceme-jax needs a model: pass pretrained=<name or path> in "
                                     "--model_args, or model=/tokenizer= from Python")
            from replaceme_jax.checkpoints import load_pretrained
            model, loaded_tokenizer = load_pretrained(str(pretrained), param_dtype=param_dtype, dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ReplaceMeError("replaceme-jax needs a tokenizer: the checkpoint carries none; pass "
                                 "tokenizer= (a transformers tokenizer)")
        self.model, self.tokenizer = model, tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else "in-process"
        self._max_length = int(max_length or model.config.max_position_embeddings)
        # The CLI passes --batch_size as a string ("8", "auto", "auto:4"); "auto" means our default.
        if isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)
        rows = batch_size if isinstance(batch_size, int) else max_batch_size or DEFAULT_MAX_BATCH_SIZE
        if rows < 1 or max_batch_tokens < 1 or max_gen_toks < 1:
            raise ReplaceMeError(f"batch_size, max_batch_tokens and max_gen_toks must be positive; got "
                                 f"{rows}, {max_batch_tokens}, {max_gen_toks}")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.scorer = TokenScorer(model, max_length=self._max_length,
                                  max_batch_tokens=int(max_batch_tokens), max_batch_size=int(rows))
        self.generator = Generator(model, tokenizer, max_batch_size=int(rows), steps_per_call=GENERATE_CHUNK_STEPS)
        self.cache = RequestCache(cache_dir, model_fingerprint(model)) if cache_dir else None
        self.cache_hits = 0

    # ------------------------------------------------------------------ harness plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "replaceme-jax").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_layers": self.model.config.num_hidden_layers,
                "model_hidden_size": self.model.config.hidden_size,
                "model_source": self.pretrained}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Same rule as the HF backend: an explicit flag wins, else add_bos_token, else the
        # tokenizer's default; a string that already starts with BOS gets no second one.
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is greedy) per (ctx, ctx_enc, cont_enc)."""
        pairs = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ReplaceMeError("a loglikelihood request has an empty context or continuation "
                                     "after tokenisation; check the task's doc_to_text/doc_to_target")
            if len(continuation_enc) > self.max_length:
                raise ReplaceMeError(f"a continuation of {len(continuation_enc)} tokens exceeds "
                                     f"max_length={self.max_length}; raise max_length in --model_args")
            # Left truncation as in the HF backend: keep the last max_length+1 tokens, feed all but
            # the last; what is left of the context conditions the continuation.
            kept = (context_enc + continuation_enc)[-(self.max_length + 1):]
            pairs.append((tuple(kept[:-len(continuation_enc)]), tuple(continuation_enc)))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = list(range(len(pairs)))
        keys = None
        if self.cache is not None:
            keys = [request_key(*p) for p in pairs]
            todo = []
            for k, key in enumerate(keys):
                hit = self.cache.get(key)
                if hit is None:
                    todo.append(k)
                else:
                    results[k] = hit
            self.cache_hits += len(pairs) - len(todo)

        def finished(indices, logprobs, greedy):
            if self.cache is not None:
                self.cache.put([keys[todo[i]] for i in indices], logprobs, greedy)

        desc = None if disable_tqdm else "replaceme-jax loglikelihood"
        logprob, greedy = self.scorer.score_pairs([pairs[k] for k in todo], progress=desc,
                                                  on_done=finished)
        for i, k in enumerate(todo):
            results[k] = (float(logprob[i]), bool(greedy[i]))
        for k, req in enumerate(requests):
            if req[0] is not None:
                self.cache_hook.add_partial("loglikelihood", req[0], results[k])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop sequence (or EOS)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            gen_kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            if gen_kwargs.get("do_sample"):
                raise ReplaceMeError("replaceme-jax generates greedily only; drop do_sample/temperature "
                                     "from the task's generation_kwargs (or --gen_kwargs)")
            until = handle_stop_sequences(gen_kwargs.get("until"), eos=eos)
            max_gen = int(gen_kwargs["max_gen_toks"])
            if max_gen >= self.max_length:
                raise ReplaceMeError(f"max_gen_toks={max_gen} leaves no room for a context within "
                                     f"max_length={self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):]
                        for i in members}
            for i, text in self._generate_group(contexts, max_gen, until).items():
                out[i] = text
        return out

    def _generate_group(self, contexts: dict[int, list[int]], max_gen: int, until: Sequence[str]) -> dict[int, str]:
        """Greedy KV-cache decoding (``inference.Generator``), cut at the stop strings as the harness does."""
        keys = list(contexts)
        outs = self.generator.generate([contexts[i] for i in keys], max_new_tokens=max_gen, stop=list(until),
                                       eos_token_ids=sorted({self.eot_token_id, *self.generator.eos_ids()}))
        return {i: postprocess_generated_text(o.text, stop=list(until), think_end_token=None)
                for i, o in zip(keys, outs)}


def main(argv: list[str] | None = None) -> None:
    """The harness's own CLI with this backend registered and our offline task YAMLs included."""
    from lm_eval.__main__ import cli_evaluate

    from replaceme_jax.eval.tasks import TASKS_DIR

    argv = list(sys.argv[1:] if argv is None else argv)
    # Every subcommand (run, ls, validate; bare flags mean run) takes --include_path.
    if argv and "--include_path" not in argv and not {"-h", "--help"} & set(argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
