"""Run settings: one typed, validated object built once from the ml_collections config.

``Settings.from_config(config)`` checks every field before anything is loaded: each choice against
the registry that implements it (solvers, selection rules, optimisers, mesh rules, dtypes, task
names), each number against its range, the tri-state ``add_bos`` parsed from CLI strings, and
unknown fields named with the closest known one. What can only be checked against the model
(``num_blocks`` against its depth, explicit cuts against its blocks) is checked right after loading.

The dataclasses mirror the config's field names (``settings.calibration.num_samples``), so code reads
the same whichever it is given; ``to_dict()`` gives the JSON of the report.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from typing import Any, get_type_hints

from replaceme_jax.errors import ReplaceMeError

DTYPES = ("float32", "bfloat16", "float16")
ACCUM_DTYPES = ("auto", "float32", "float64")
CANDIDATES = ("all", "selected")
MULTI_CUT = ("auto", "one_pass", "sequential")
COSINE_INIT = ("lstsq", "identity")
RIDGE_TARGETS = ("zero", "identity")
LAYOUTS = ("passages", "stream", "mixed")
# Transform estimators. Closed form: from the normal equations of the statistics pass. Token: Optax on
# streamed calibration tokens (the cosine objective of the paper, its accurate form, or plain MSE).
CLOSED_FORM_SOLVERS = ("lstsq", "diag", "orth_diag")
TOKEN_SOLVERS = ("cosine", "cosine_accurate", "mse")
SOLVERS = CLOSED_FORM_SOLVERS + TOKEN_SOLVERS
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def selection_rules() -> tuple[str, ...]:
    """The registered selection rules (angular, residual, search)."""
    from replaceme_jax.replaceme.selection import SELECTION_RULES
    return tuple(sorted(SELECTION_RULES))


def optimizers() -> tuple[str, ...]:
    from replaceme_jax.replaceme.solvers import OPTIMIZERS
    return tuple(OPTIMIZERS)


def mesh_rules() -> tuple[str, ...]:
    from replaceme_jax.models.sharding import RULE_SETS
    return tuple(sorted(RULE_SETS))


class _Section:
    """Config-like reads for code written against a ConfigDict (``get``, ``to_dict``)."""

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict:
        return {f.name: (v.to_dict() if isinstance(v := getattr(self, f.name), _Section) else v)
                for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class CalibrationSettings(_Section):
    source: str = "boolq"
    num_samples: int | None = 256      # passages of the calibration part; None: all of them
    max_length: int = 512
    batch_size: int = 8
    seed: int = 0
    text_column: str = ""
    messages_column: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    add_bos: str | bool = "auto"       # auto | True | False (CLI strings true/false/auto parsed)
    include_pad: bool = False
    packing: bool = True
    layout: str = "passages"           # passages: one sequence each | stream: joined, cut into full rows
                                       # | mixed: the first half as passages, the second as a stream
    validation_fraction: float = 0.1   # share of the source held out as the validation part
    validation_samples: int = 32       # validation passages the search rule scores each cut on


@dataclasses.dataclass(frozen=True)
class CosineSettings(_Section):
    init: str = "lstsq"
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 300
    batch_size: int = 1024
    l1: float = 0.0
    l2: float = 0.0
    token_budget_mb: float = 512
    buffer_dir: str = ""


@dataclasses.dataclass(frozen=True)
class BudgetSettings(_Section):
    blocks: int = 0            # 0: off (num_blocks x num_transforms as given)
    max_cuts: int = 2
    min_cut_blocks: int = 1
    proxy: str = "stream"
    confirm: int = 4


@dataclasses.dataclass(frozen=True)
class HealSettings(_Section):
    steps: int = 0             # LoRA distillation steps; 0: none
    anchor_steps: int = 0      # anchor tuning steps (each cut's anchor block retrained), before LoRA; 0: none
    anchor_lr: float = 3e-3
    anchor_loss: str = "token"  # token | mse (replaceme/anchor_tuning.py)
    lr: float = 5e-4
    warmup: int = 10
    rank: int = 16
    lora_alpha: float = 32.0
    blocks: str = "all"        # all | adjacent | comma list of pruned-model block indices
    modules: str = "all"       # all | comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    num_samples: int = 2048    # passages of the healing source's training part
    source: str = ""           # healing text (any calibration.source); "": the calibration source
    max_length: int = 256
    batch_size: int = 4
    checkpoint_every: int = 50
    seed: int = 0


def parse_ridge_grid(text: str, field: str, example: str) -> tuple[float, ...]:
    """'0, 1e-3,inf' -> (0.0, 0.001, inf): comma-separated relative ridge strengths, each >= 0;
    errors name ``field`` and show ``example``."""
    values = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            values.append(float(part))
        except ValueError:
            raise ReplaceMeError(f"{field}={text!r}: {part!r} is not a number; give relative ridge strengths, "
                                 f"comma-separated, e.g. {example}") from None
    if any(not v >= 0 for v in values):
        raise ReplaceMeError(f"{field}={text!r}: every value must be >= 0")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class RefitSettings(_Section):
    anchor: bool = True        # re-fit each cut's anchor down_proj in closed form (replaceme/refit.py)
    alpha_grid: str = "1e-6,1e-5,1e-4,1e-3,1e-2,3e-2,1e-1,inf"  # relative ridge toward W T; inf keeps W T
    weighting: str = "none"    # "token": each token weighs 1 / ||target||² (relative error per token)
    downstream: int = 0        # re-fit the down_proj of this many blocks after each cut toward the dense stream


@dataclasses.dataclass(frozen=True)
class EvalSettings(_Section):
    perplexity_windows: int = 16
    window: int = 1024
    compare_drop: bool = True
    limit: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSettings(_Section):
    data: int = 1
    model: int = 1
    rules: str = "fsdp"


@dataclasses.dataclass(frozen=True)
class Settings(_Section):
    """Everything a ReplaceMe run depends on. ``num_blocks`` is the number of blocks removed per cut
    (the official ``layers_to_skip``), not the model's depth (``ModelConfig.num_hidden_layers``)."""
    model: str = "smollm2-135m"
    param_dtype: str = "float32"
    dtype: str = "float32"
    calibration: CalibrationSettings = CalibrationSettings()
    num_blocks: int = 8
    num_transforms: int = 1
    merge_consecutive: bool = True
    selection: str = "residual"
    cuts: str = ""
    candidates: str = "all"
    accum_dtype: str = "auto"
    solver: str = "lstsq"
    alpha: float = 0.0
    ridge_target: str = "zero"         # zero | identity (lstsq only): what the ridge shrinks T toward
    alpha_grid: str = ""               # comma list of relative ridge strengths chosen on validation text
    multi_cut: str = "auto"
    budget: BudgetSettings = BudgetSettings()
    refit: RefitSettings = RefitSettings()
    heal: HealSettings = HealSettings()
    cosine: CosineSettings = CosineSettings()
    seed: int = 0
    output_dir: str = "runs/smollm2-135m"
    overwrite: bool = False
    save_orbax: bool = True
    export_hf: bool = True
    eval: EvalSettings = EvalSettings()
    evaluate: str = ""
    mesh: MeshSettings = MeshSettings()
    architecture: str = ""
    distributed: bool = False
    progress: bool = True

    def pruning_dict(self) -> dict:
        """The settings the pruned model (before healing) depends on: what a resumable healing state
        is fingerprinted with, so a re-run with another solver, re-fit or calibration starts over."""
        d = self.to_dict()
        for k in ("heal", "output_dir", "overwrite", "save_orbax", "export_hf", "eval", "evaluate", "mesh",
                  "distributed", "progress"):
            d.pop(k)
        return d

    def alpha_values(self) -> tuple[float, ...]:
        """The parsed ``alpha_grid`` (relative ridge strengths; empty: use ``alpha`` as it is)."""
        return parse_ridge_grid(self.alpha_grid, "alpha_grid", "0,1e-4,1e-3,1e-2")

    @classmethod
    def from_config(cls, config) -> "Settings":
        """Validated settings from a ConfigDict, a mapping or a Settings (returned as is)."""
        if isinstance(config, Settings):
            return config
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        settings = _build(cls, raw, "")
        _validate(settings)
        return settings

    def replace(self, **changes) -> "Settings":
        """A copy with dotted fields changed (``replace(**{"calibration.num_samples": 64})``), validated."""
        raw = self.to_dict()
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = raw
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ReplaceMeError(f"unknown setting {key!r}{_suggest(p, node)}")
                node = node[p]
            if leaf not in node:
                raise ReplaceMeError(f"unknown setting {key!r}{_suggest(leaf, node)}")
            node[leaf] = value
        return Settings.from_config(raw)

    @property
    def blocks_removed(self) -> int:
        """Blocks the run removes in all (before merging touching cuts)."""
        return self.budget.blocks or self.num_blocks * self.num_transforms

    @property
    def multi_cut_mode(self) -> str:
        """one_pass or sequential (auto: sequential for the token solvers, as the official code)."""
        if self.multi_cut == "auto":
            return "sequential" if self.solver in TOKEN_SOLVERS else "one_pass"
        return self.multi_cut

    def resolved_add_bos(self, tokenizer) -> bool:
        """auto follows the tokenizer: SmolLM2's does not prepend BOS, Llama's does."""
        if self.calibration.add_bos != "auto":
            return bool(self.calibration.add_bos)
        probe = tokenizer("a")["input_ids"]
        return bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id


# ----------------------------------------------------------------------------- building


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"


def _build(cls, raw: dict, prefix: str):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ReplaceMeError(f"unknown setting {prefix + unknown[0]!r}{_suggest(unknown[0], names)}")
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in raw:
            continue  # the dataclass default
        value, hint = raw[f.name], hints[f.name]
        if isinstance(hint, type) and issubclass(hint, _Section):
            if not isinstance(value, dict):
                value = value.to_dict() if hasattr(value, "to_dict") else value
            if not isinstance(value, dict):
                raise ReplaceMeError(f"setting {key!r} is a group of settings, got {value!r}")
            values[f.name] = _build(hint, value, key + ".")
        else:
            values[f.name] = _coerce(key, value, hint)
    return cls(**values)


def _coerce(key: str, value, hint):
    """``value`` as the field's type; CLI-style strings accepted for booleans and numbers."""
    if key == "calibration.add_bos":
        return _tri_state(key, value)
    args = typing.get_args(hint)  # "int | None" -> (int, NoneType)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if value is None:
        if optional:
            return None
        raise ReplaceMeError(f"setting {key!r} cannot be None; give a {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ReplaceMeError(f"setting {key!r} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not _is_int(value):
            raise ReplaceMeError(f"setting {key!r} must be an integer, got {value!r}")
        return int(value)
    if base is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ReplaceMeError(f"setting {key!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise ReplaceMeError(f"setting {key!r} must be a finite number, got {value!r}")
        return out
    if base is str:
        if not isinstance(value, str):
            raise ReplaceMeError(f"setting {key!r} must be a string, got {value!r}")
        return value.strip()
    return value


def _is_int(value) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None
    return hasattr(value, "__index__")


def _tri_state(key: str, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in _TRUE + _FALSE:
        return text in _TRUE
    raise ReplaceMeError(f"setting {key!r} must be auto, true or false, got {value!r}")


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value, choices, what: str | None = None) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ReplaceMeError(f"{key}={value!r}: unknown {what or key}; {hint}choose one of {', '.join(choices)}")


def _at_least(key: str, value, low, hint: str = "") -> None:
    if value < low:
        raise ReplaceMeError(f"{key}={value!r} must be at least {low}{hint}")


def _positive(key: str, value, hint: str = "") -> None:
    if not value > 0:  # also catches NaN
        raise ReplaceMeError(f"{key}={value!r} must be positive{hint}")


def _validate(s: Settings) -> None:
    if not s.model:
        raise ReplaceMeError("model is empty; give a registry name, a .gguf file, an HF directory or an "
                             "Orbax checkpoint (--config.model=...)")
    _choice("param_dtype", s.param_dtype, DTYPES, "parameter dtype")
    _choice("dtype", s.dtype, DTYPES, "compute dtype")
    c = s.calibration
    if not c.source:
        raise ReplaceMeError("calibration.source is empty; use boolq, hellaswag, coqa, self, a file/folder or hf:<name>")
    if c.num_samples is not None and c.num_samples < 1:
        raise ReplaceMeError(f"calibration.num_samples={c.num_samples} must be at least 1 (a passage count; "
                             "None in Python takes every passage)")
    _at_least("calibration.max_length", c.max_length, 2)
    _at_least("calibration.batch_size", c.batch_size, 1)
    _choice("calibration.layout", c.layout, LAYOUTS, "calibration layout")
    _at_least("calibration.seed", c.seed, 0)
    if not 0.0 <= c.validation_fraction < 1.0:
        raise ReplaceMeError(f"calibration.validation_fraction={c.validation_fraction} must be in [0, 1): the "
                             "share of the source held out for validation (0.1 by default)")
    _at_least("calibration.validation_samples", c.validation_samples, 1)
    _at_least("num_blocks", s.num_blocks, 1, " (blocks removed per cut)")
    _at_least("num_transforms", s.num_transforms, 1, " (the number of cuts)")
    _choice("selection", s.selection, selection_rules(), "selection rule")
    if s.cuts:
        from replaceme_jax.replaceme.cuts import parse_cut_syntax
        parse_cut_syntax(s.cuts)
    _choice("candidates", s.candidates, CANDIDATES)
    _choice("accum_dtype", s.accum_dtype, ACCUM_DTYPES)
    _choice("solver", s.solver, SOLVERS, "solver")
    _at_least("alpha", s.alpha, 0.0, " (ridge strength)")
    _choice("ridge_target", s.ridge_target, RIDGE_TARGETS)
    if s.ridge_target != "zero" and s.solver not in ("lstsq", "cosine", "cosine_accurate", "mse"):
        raise ReplaceMeError(f"ridge_target={s.ridge_target!r} applies to lstsq (and the cosine solvers' lstsq "
                             f"init); solver {s.solver!r} shrinks toward zero only. Fix: solver=lstsq")
    if s.alpha_grid:
        if s.solver not in CLOSED_FORM_SOLVERS:
            raise ReplaceMeError(f"alpha_grid chooses a closed-form solver's ridge on validation text; solver "
                                 f"{s.solver!r} is trained by Optax. Fix: one of {CLOSED_FORM_SOLVERS}, or alpha=")
        s.alpha_values()
    _choice("multi_cut", s.multi_cut, MULTI_CUT)
    _validate_budget(s)
    from replaceme_jax.replaceme.refit import WEIGHTINGS, parse_grid
    _at_least("refit.downstream", s.refit.downstream, 0, " (blocks after each cut whose down_proj is re-fitted; 0: none)")
    if s.refit.anchor or s.refit.downstream:
        parse_grid(s.refit.alpha_grid)
    _choice("refit.weighting", s.refit.weighting, WEIGHTINGS)
    _validate_heal(s.heal)
    k = s.cosine
    _choice("cosine.init", k.init, COSINE_INIT)
    _choice("cosine.optimizer", k.optimizer, optimizers(), "optimizer")
    _positive("cosine.lr", k.lr, " (1e-4 by default)")
    _at_least("cosine.steps", k.steps, 1)
    _at_least("cosine.batch_size", k.batch_size, 1)
    _at_least("cosine.l1", k.l1, 0.0)
    _at_least("cosine.l2", k.l2, 0.0)
    _positive("cosine.token_budget_mb", k.token_budget_mb)
    _at_least("seed", s.seed, 0)
    if not s.output_dir:
        raise ReplaceMeError("output_dir is empty; give a directory for the run's outputs")
    e = s.eval
    _at_least("eval.perplexity_windows", e.perplexity_windows, 0, " (0 skips held-out perplexity)")
    _at_least("eval.window", e.window, 2, " (tokens per perplexity window)")
    _at_least("eval.limit", e.limit, 0, " (0: every item)")
    if s.evaluate:
        from replaceme_jax.eval.tasks import resolve_tasks
        resolve_tasks(s.evaluate)
    for axis in ("data", "model"):
        size = getattr(s.mesh, axis)
        if size != -1 and size < 1:
            raise ReplaceMeError(f"mesh.{axis}={size} must be a device count >= 1, or -1 for all devices")
    _choice("mesh.rules", s.mesh.rules, mesh_rules())


def _validate_heal(h: HealSettings) -> None:
    _at_least("heal.steps", h.steps, 0, " (LoRA distillation steps of the healing stage; 0: none)")
    _at_least("heal.anchor_steps", h.anchor_steps, 0, " (anchor tuning steps of the healing stage; 0: none)")
    if h.anchor_steps:
        _positive("heal.anchor_lr", h.anchor_lr, " (3e-3 by default)")
        _choice("heal.anchor_loss", h.anchor_loss, ("mse", "token"))
        _at_least("heal.warmup", h.warmup, 0)
        _at_least("heal.seed", h.seed, 0)
    if not h.steps:
        return
    _positive("heal.lr", h.lr, " (5e-4 by default)")
    _at_least("heal.warmup", h.warmup, 0)
    _at_least("heal.rank", h.rank, 1, " (adapter rank)")
    _positive("heal.lora_alpha", h.lora_alpha, " (the adapter scale is lora_alpha / rank)")
    _at_least("heal.num_samples", h.num_samples, 1)
    _at_least("heal.max_length", h.max_length, 2)
    _at_least("heal.batch_size", h.batch_size, 1)
    _at_least("heal.checkpoint_every", h.checkpoint_every, 1)
    _at_least("heal.seed", h.seed, 0)
    from replaceme_jax.replaceme.heal import target_modules
    target_modules(h.modules)
    if h.blocks not in ("adjacent", "all"):
        try:
            [int(p) for p in h.blocks.split(",") if p.strip()]
        except ValueError:
            raise ReplaceMeError(f"heal.blocks={h.blocks!r}: use adjacent, all or pruned-model block indices, "
                                 "e.g. 10,11") from None


def _validate_budget(s: Settings) -> None:
    b = s.budget
    _at_least("budget.blocks", b.blocks, 0, " (total blocks removed over several cuts; 0: off)")
    if not b.blocks:
        return
    _at_least("budget.max_cuts", b.max_cuts, 1)
    _at_least("budget.min_cut_blocks", b.min_cut_blocks, 1)
    _at_least("budget.confirm", b.confirm, 0, " (top combinations confirmed on validation text; 0: trust the proxy)")
    from replaceme_jax.replaceme.budgets import PROXIES
    _choice("budget.proxy", b.proxy, PROXIES)
    if b.min_cut_blocks > b.blocks:
        raise ReplaceMeError(f"budget.min_cut_blocks={b.min_cut_blocks} exceeds budget.blocks={b.blocks}")
    if s.cuts:
        raise ReplaceMeError(f"cuts={s.cuts!r} and budget.blocks={b.blocks} both choose the cuts; give one "
                             "(budget.blocks=0 keeps explicit cuts)")
    if s.num_transforms != 1:
        raise ReplaceMeError(f"num_transforms={s.num_transforms} with budget.blocks={b.blocks}: the budget "
                             "chooses the number of cuts; set budget.max_cuts instead (num_transforms=1)")
    if s.selection not in ("residual", "angular"):
        raise ReplaceMeError(f"budget.blocks scores combinations by a cheap per-cut score; selection="
                             f"{s.selection!r} is not one. Fix: selection=residual (or angular); the top "
                             "combinations are confirmed by validation NLL (budget.confirm)")
    if s.candidates != "all":
        raise ReplaceMeError("budget.blocks scores and confirms combinations from every candidate cut's "
                             "sums; set candidates=all")


def check_against_model(s: Settings, depth: int) -> None:
    """The checks that need the model's depth (number of blocks)."""
    if s.budget.blocks and not s.budget.blocks <= depth - 1:
        raise ReplaceMeError(f"budget.blocks={s.budget.blocks} but the model has {depth} blocks: choose "
                             f"1 <= budget.blocks <= {depth - 1} (block 0 stays as an anchor)")
    if not s.budget.blocks and not 1 <= s.num_blocks <= depth - 1:  # num_blocks is unused with a budget
        raise ReplaceMeError(f"num_blocks={s.num_blocks} but the model has {depth} blocks: choose "
                             f"1 <= num_blocks <= {depth - 1} (a cut keeps block 0 as its anchor)")
