"""A resumable sweep of ReplaceMe and its baselines: prune, evaluate, tabulate, plot.

Rows are the product of the sweep settings (``configs/ablation_smollm2.py``): method x solver x
blocks per cut x number of transforms x ridge alpha x calibration size x selection rule (a setting
only multiplies the methods it applies to). The statistics pass, ShortGPT's Block Influence,
SLEB's greedy order and the search rule's scores are cached under ``<output_dir>/cache`` keyed by
their settings; each finished row is one JSON file under ``<output_dir>/rows``, so an interrupted
sweep resumes where it stopped. After every row the tables (``results.csv``, ``results.md``,
``selection.md`` when the search rule ran) and ``plots.png`` are rewritten atomically
(``experiments.tables``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from replaceme_jax.baselines import methods as mth
from replaceme_jax.eval.nll import subset_batches
from replaceme_jax.replaceme.search import CLOSED_FORM, search_scores
from replaceme_jax.baselines.shortgpt import block_influence
from replaceme_jax.baselines.sleb import SlebResult, sleb_order
from replaceme_jax.experiments.statistics_cache import cached_statistics, digest
from replaceme_jax.experiments.tables import read_rows, sort_rows, write_outputs
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.io_utils import atomic_write_json

SELECTIONS = ("angular", "residual", "search")


def sweep_config():
    """Default sweep settings (``configs/ablation_smollm2.py`` adds the README-table, selection-study
    and small modes). Sweep lists are comma-separated strings."""
    import ml_collections

    from replaceme_jax.replaceme.config import default_config
    c = ml_collections.ConfigDict()
    # The pipeline settings every row shares (model, calibration data, cosine solver, ...).
    p = default_config()
    p.model = "smollm2-135m"
    p.calibration.num_samples = 128  # overridden per row by sweep.calibration_sizes
    p.calibration.max_length = 256
    p.calibration.batch_size = 8
    p.progress = False
    # The rows compare the paper's estimators of T; the anchor kernel re-fit is a lever of its own
    # (scripts/study_levers.py), so it is off here unless a config turns it on.
    p.refit.anchor = False
    c.pipeline = p

    c.sweep = ml_collections.ConfigDict()
    c.sweep.methods = "replaceme,drop,shortgpt,sleb"  # replaceme | drop | shortgpt | sleb
    c.sweep.solvers = "lstsq,diag,orth_diag,cosine"   # ReplaceMe's transform estimators
    c.sweep.selections = "residual"                   # ReplaceMe's rules: angular | residual | search
    c.sweep.drop_selections = "angular"               # drop's rules ("": same as selections); UIDL's is angular
    c.sweep.num_blocks = "4,6,8,10"                   # blocks per cut
    c.sweep.num_transforms = "1"
    c.sweep.alphas = "0"
    c.sweep.calibration_sizes = "128"                 # calibration passages

    c.sleb = ml_collections.ConfigDict()
    c.sleb.num_sequences = 16     # calibration sequences scored per candidate model
    c.sleb.max_candidates = 0     # 0: try every remaining block; k: the k of lowest Block Influence

    c.search = ml_collections.ConfigDict()
    c.search.num_samples = 32     # validation passages (calibration source's validation part)

    c.eval = ml_collections.ConfigDict()
    c.eval.ppl_windows = 8        # held-out Wikipedia windows (0: all)
    c.eval.window = 1024
    c.eval.ppl_batch_size = 4
    c.eval.tasks = "paper"        # lm-eval tasks for Avg-acc ("" to skip)
    c.eval.limit = 100            # first items per task (0: all); tables state it
    c.eval.batch_size = 64
    c.eval.max_batch_tokens = 4096

    c.output_dir = "runs/ablation"
    c.save_models = False         # True: every row's pruned model as <output_dir>/models/<row>/hf (for lm-eval)
    c.overwrite = False           # True: drop the rows of a sweep that had other fixed settings
    c.plots = True
    c.progress = True
    return c


@dataclasses.dataclass(frozen=True)
class Row:
    """One pruned model of the sweep; fields that do not apply to a method are None."""
    method: str
    removed: int                  # blocks removed in total
    calibration_size: int
    solver: str | None = None
    selection: str | None = None
    blocks_per_cut: int | None = None
    num_transforms: int | None = None
    alpha: float | None = None

    @property
    def id(self) -> str:
        parts = [self.method, self.solver, self.selection, f"n{self.blocks_per_cut}" if self.blocks_per_cut else None,
                 f"T{self.num_transforms}" if self.num_transforms else None,
                 f"a{self.alpha:g}" if self.alpha is not None else None, f"r{self.removed}",
                 f"cal{self.calibration_size}"]
        return "_".join(p for p in parts if p is not None)


def _split(value, cast) -> list:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = [cast(str(x).strip()) for x in items if str(x).strip()]
    except ValueError as e:
        raise ReplaceMeError(f"cannot read the sweep list {value!r}: {e}; write comma-separated values") from e
    if not out:
        raise ReplaceMeError(f"empty sweep list {value!r}; give at least one value")
    return list(dict.fromkeys(out))


def sweep_rows(cfg) -> list[Row]:
    """Every row of the sweep, deduplicated, in a stable order."""
    sw = cfg.sweep
    methods = _split(sw.methods, str)
    unknown = [m for m in methods if m not in mth.METHODS]
    if unknown:
        raise ReplaceMeError(f"unknown methods {unknown}; choose from {mth.METHODS}")
    solver_names = _split(sw.solvers, str)
    bad = [s for s in solver_names if s not in mth.SOLVER_NAMES]
    if bad:
        raise ReplaceMeError(f"unknown solvers {bad}; choose from {mth.SOLVER_NAMES}")
    selections = _split(sw.selections, str)
    drop_selections = _split(sw.drop_selections, str) if sw.get("drop_selections") else selections
    bad = [s for s in selections + drop_selections if s not in SELECTIONS]
    if bad:
        raise ReplaceMeError(f"unknown selection rules {bad}; choose from {SELECTIONS}")
    sizes, ns = _split(sw.calibration_sizes, int), _split(sw.num_blocks, int)
    counts, alphas = _split(sw.num_transforms, int), _split(sw.alphas, float)
    rows = []
    for cal in sizes:
        for n in ns:
            for t in counts:
                for method in methods:
                    if method == "replaceme":
                        rows += [Row("replaceme", n * t, cal, s, r, n, t, a)
                                 for s in solver_names for r in selections for a in alphas]
                    elif method == "drop":
                        rows += [Row("drop", n * t, cal, None, r, n, t) for r in drop_selections]
                    else:
                        rows.append(Row(method, n * t, cal))
    return list(dict.fromkeys(rows))


def fixed_settings(cfg) -> dict:
    """Everything a row's numbers depend on that is not a sweep dimension (checked on resume)."""
    p = cfg.pipeline
    # Packing changes how the tokens are laid out, not the statistics (equal to ~1e-6), so a sweep
    # resumes across it.
    cal = {k: v for k, v in p.calibration.to_dict().items() if k not in ("num_samples", "packing")}
    return {"model": p.model, "param_dtype": p.param_dtype, "dtype": p.dtype, "calibration": cal,
            "accum_dtype": p.accum_dtype, "merge_consecutive": p.merge_consecutive, "cosine": p.cosine.to_dict(),
            "seed": p.seed, "sleb": cfg.sleb.to_dict(), "search": cfg.search.to_dict(),
            "eval": cfg.eval.to_dict()}


class Evaluator:
    """Held-out perplexity and (optionally) lm-eval accuracies of a model, with the corpus tokenised once."""

    def __init__(self, tokenizer, ecfg):
        from replaceme_jax.eval.perplexity import HeldOutPerplexity
        self.tokenizer, self.cfg = tokenizer, ecfg
        self.ppl = HeldOutPerplexity(tokenizer, window=ecfg.window, max_windows=ecfg.ppl_windows or None,
                                     batch_size=ecfg.ppl_batch_size)

    def __call__(self, model) -> dict:
        e = self.cfg
        t0 = time.perf_counter()
        out = {"heldout_ppl": self.ppl(model).to_dict()}
        if e.tasks:
            from replaceme_jax.eval.harness import evaluate_models
            from replaceme_jax.eval.report import avg_acc
            res = evaluate_models([("model", model, self.tokenizer)], tasks=e.tasks, limit=e.limit or None,
                                  heldout_ppl=False, batch_size=e.batch_size, max_batch_tokens=e.max_batch_tokens)
            record = res["models"]["model"]
            out["tasks"] = record["tasks"]
            out["avg_acc"] = avg_acc(record)
        out["eval_seconds"] = round(time.perf_counter() - t0, 1)
        return out


class Sweep:
    """Runs ``sweep_rows(cfg)`` into ``cfg.output_dir``, skipping rows already there."""

    def __init__(self, cfg, model=None, tokenizer=None, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output_dir)
        self.rows_dir, self.cache = self.out / "rows", self.out / "cache"
        self.model, self.tokenizer = model, tokenizer
        self.rows = sweep_rows(cfg)
        self._check_resume()
        self._evaluator = None

    def _check_resume(self):
        settings = fixed_settings(self.cfg)
        path = self.out / "sweep.json"
        if path.exists():
            old = json.loads(path.read_text())["fixed"]
            if old != json.loads(json.dumps(settings)):
                if not self.cfg.overwrite:
                    changed = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings[k])))
                    raise ReplaceMeError(
                        f"{self.out} holds a sweep with other fixed settings ({', '.join(changed)}); resume it "
                        "with the same settings, pick another output_dir, or set overwrite=True to drop its rows")
                shutil.rmtree(self.rows_dir, ignore_errors=True)
        atomic_write_json(path, {"fixed": settings, "rows": [r.id for r in self.rows]})

    # -- cached inputs ------------------------------------------------------------------------
    def _load(self):
        if self.model is None:
            from replaceme_jax.checkpoints import load_pretrained
            p = self.cfg.pipeline
            self.model, self.tokenizer = load_pretrained(p.model, param_dtype=p.param_dtype, dtype=p.dtype)
        return self.model, self.tokenizer

    def _calibration(self, size: int):
        from replaceme_jax.replaceme.pipeline import calibration_batches
        cal = self.cfg.pipeline.calibration.copy_and_resolve_references()
        cal.num_samples = size
        key = {"fixed": fixed_settings(self.cfg)["calibration"], "model": self.cfg.pipeline.model,
               "dtype": [self.cfg.pipeline.param_dtype, self.cfg.pipeline.dtype],
               "accum_dtype": self.cfg.pipeline.accum_dtype, "num_samples": size}
        return calibration_batches(self.tokenizer, cal), key

    def _validation(self):
        from replaceme_jax.replaceme.pipeline import calibration_batches
        cal = self.cfg.pipeline.calibration.copy_and_resolve_references()
        cal.num_samples = self.cfg.search.num_samples
        return calibration_batches(self.tokenizer, cal, part="validation")

    def _cached_json(self, name: str, key: dict, compute):
        path = self.cache / f"{name}-{digest(key)}.json"
        if path.exists():
            return json.loads(path.read_text())["value"]
        value = compute()
        atomic_write_json(path, {"key": key, "value": value})
        return value

    def _sleb_order(self, batches, key: dict, n: int, influence) -> SlebResult:
        """The cached greedy order, extended one block at a time (each step saved) up to ``n``."""
        s = self.cfg.sleb
        # "scored": SLEB scores exactly the first num_sequences sequences (earlier: whole batches).
        key = {**key, "sleb": s.to_dict(), "scored": "first_sequences"}
        path = self.cache / f"sleb-{digest(key)}.json"
        order = None
        if path.exists():
            saved = json.loads(path.read_text())["value"]
            order = SlebResult(tuple(saved["order"]), tuple(saved["losses"]), 0)
        scored = subset_batches(batches, s.num_sequences or None)
        while order is None or len(order.order) < n:
            k = 1 if order is None else len(order.order) + 1
            order = sleb_order(self.model, scored, k, max_candidates=s.max_candidates or None,
                               prefilter=influence if s.max_candidates else None, start=order,
                               progress=self.cfg.progress)
            atomic_write_json(path, {"key": key, "value": {"order": list(order.order),
                                                           "losses": list(order.losses)}})
        return order

    # -- rows ---------------------------------------------------------------------------------
    def done(self) -> set[str]:
        return {p.stem for p in self.rows_dir.glob("*.json")} if self.rows_dir.exists() else set()

    def _save_row(self, name: str, record: dict):
        atomic_write_json(self.rows_dir / f"{name}.json", record)
        write_outputs(self.out, load_rows(self.out, self.cfg), self.cfg)

    def _evaluate(self, model) -> dict:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.tokenizer, self.cfg.eval)
        return self._evaluator(model)

    def run(self) -> list[dict]:
        done = self.done()
        pending = [r for r in self.rows if r.id not in done]
        self.log(f"sweep: {len(self.rows)} rows, {len(self.rows) - len(pending)} already done, "
                 f"{len(pending)} to run -> {self.out}")
        if "dense" not in done or pending:
            self._load()
        if "dense" not in done:
            self.log("evaluating the dense model")
            evaluation = self._evaluate(self.model)
            self._save_row("dense", {"id": "dense", "method": "dense", "removed": 0,
                                     "num_blocks": self.model.config.num_hidden_layers, **evaluation})
            self.log(f"[dense] {_summary(evaluation)}")
        for size in dict.fromkeys(r.calibration_size for r in pending):
            self._run_size(size, [r for r in pending if r.calibration_size == size])
        rows = load_rows(self.out, self.cfg)
        write_outputs(self.out, rows, self.cfg)
        return rows

    def _run_size(self, size: int, rows: list[Row]):
        model, p = self.model, self.cfg.pipeline
        batches, key = self._calibration(size)
        ns = sorted({r.blocks_per_cut for r in rows if r.method in ("replaceme", "drop")})
        stats = cached_statistics(self.cache, key, ns, model, batches, include_pad=p.calibration.include_pad,
                                  accum_dtype=p.accum_dtype, progress=self.cfg.progress) if ns else {}
        influence = None
        if any(r.method == "shortgpt" for r in rows) or (self.cfg.sleb.max_candidates and
                                                        any(r.method == "sleb" for r in rows)):
            influence = np.asarray(self._cached_json(
                "influence", key, lambda: [float(x) for x in block_influence(model, batches)]))
        validation = None
        if any(r.selection == "search" for r in rows) or (p.refit.anchor and any(r.method == "replaceme" for r in rows)):
            validation = self._validation()
        for row in rows:
            t0 = time.perf_counter()
            scores = None
            if row.selection == "search":
                solver = "none" if row.method == "drop" else (row.solver if row.solver in CLOSED_FORM else "lstsq")
                alpha = row.alpha or 0.0
                raw = self._cached_json(
                    "search", {**key, "n": row.blocks_per_cut, "solver": solver, "alpha": alpha,
                               "search": self.cfg.search.to_dict()},
                    lambda: {f"{s}-{e}": v for (s, e), v in search_scores(
                        stats[row.blocks_per_cut], row.blocks_per_cut, alpha, model=model, validation=validation,
                        solver=solver, progress=self.cfg.progress).items()})
                scores = {tuple(int(x) for x in c.split("-")): v for c, v in raw.items()}
            if row.method == "replaceme":
                result = mth.replaceme(model, batches, stats[row.blocks_per_cut], row.blocks_per_cut,
                                       solver=row.solver, alpha=row.alpha, rule=row.selection,
                                       num_transforms=row.num_transforms, merge_consecutive=p.merge_consecutive,
                                       validation=validation, scores=scores, cfg=p)
            elif row.method == "drop":
                result = mth.drop(model, stats[row.blocks_per_cut], row.blocks_per_cut, rule=row.selection,
                                  num_transforms=row.num_transforms, merge_consecutive=p.merge_consecutive,
                                  validation=validation, scores=scores)
            elif row.method == "shortgpt":
                result = mth.shortgpt(model, row.removed, influence=influence)
            else:
                order = self._sleb_order(batches, key, row.removed, influence)
                result = mth.sleb(model, row.removed, order=order)
            prune_seconds = time.perf_counter() - t0
            # Rows that prune identically (e.g. two rules choosing the same cut) share one evaluation.
            evaluation = self._cached_json(
                "eval", {**key, "eval": self.cfg.eval.to_dict(), "pruned": pruned_identity(result)},
                lambda: self._evaluate(result.model))
            record = {**dataclasses.asdict(row), "id": row.id, "removed_blocks": result.removed,
                      "cuts": [list(c) for c in result.cuts], "num_blocks": result.model.config.num_hidden_layers,
                      "residuals": result.info.get("residuals"), "selection_scores": result.info.get("scores"),
                      "prune_seconds": round(prune_seconds, 1), **evaluation}
            if self.cfg.save_models:
                self._save_model(row.id, result.model)
            self._save_row(row.id, record)
            self.log(f"[{row.id}] blocks {result.removed}: {_summary(evaluation)}, {prune_seconds:.0f} s prune")

    def _save_model(self, name: str, model):
        """The row's pruned model as a Hugging Face checkpoint (atomic; a re-run replaces it)."""
        from replaceme_jax.checkpoints.hf import save_hf
        path = save_hf(model, self.out / "models" / name / "hf", tokenizer=self.tokenizer, overwrite=True)
        self.log(f"[{name}] saved {path}")


def pruned_identity(result) -> dict:
    """What the pruned model is made of: the removed blocks and a digest of every transform."""
    h = hashlib.sha256()
    for T in result.transforms:
        h.update(b"none" if T is None else np.ascontiguousarray(np.asarray(T, np.float32)).tobytes())
    return {"removed": [int(b) for b in result.removed], "transforms": h.hexdigest()[:16]}


def _summary(evaluation: dict) -> str:
    acc = evaluation.get("avg_acc")
    return (f"held-out ppl {evaluation['heldout_ppl']['ppl']:.2f}" + (f", Avg-acc {acc:.3f}" if acc is not None else "")
            + f" ({evaluation['eval_seconds']:.0f} s eval)")


def run_sweep(cfg, model=None, tokenizer=None, log=print) -> list[dict]:
    """Run (or resume) the sweep of ``cfg``; returns every finished row's record (dense first)."""
    return Sweep(cfg, model, tokenizer, log).run()


def load_rows(output_dir, cfg=None) -> list[dict]:
    """Finished rows (dense first); with ``cfg``, only the dense row and the rows of its sweep (rows of
    earlier, wider sweeps stay on disk and come back when the lists include them again)."""
    rows = read_rows(output_dir)
    if cfg is not None:
        wanted = {r.id for r in sweep_rows(cfg)} | {"dense"}
        rows = [r for r in rows if r["id"] in wanted]
    return sort_rows(rows)
