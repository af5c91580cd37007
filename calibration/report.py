"""The calibration report: a markdown table of the trials and the chosen recipe, and PNG plots.

Plots (matplotlib, imported when saving): ``quality_vs_time.png`` (every trial, feasible or not,
with the chosen point and the budget line), ``layers.png`` (per-layer threshold and kept
fraction of the chosen recipe) and ``steps.png`` (kept fraction per denoising step).

Example:
    >>> recipe, report = calibrate(run, samples, "psnr >= 30", model=model, trials=12)
    >>> paths = report.save("calibration-out")          # report.md, trials.json and the PNGs
    >>> print(report.to_markdown())
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def trial_rows(study) -> list[dict]:
    """One plain dict per finished trial of the study: parameters, quality, sparsity, time, feasibility,
    and why a failed trial failed. Trials that stepped back (never evaluated) are left out."""
    from .feasibility import is_feasible
    from .workers import ERROR_ATTR, ORIGIN_ATTR, YIELD_ATTR

    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or YIELD_ATTR in t.user_attrs:
            continue
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "feasible": is_feasible(t),
            "quality": t.user_attrs.get("quality", {}),
            "metrics": t.user_attrs.get("metrics", {}),
            "kept_fraction": t.user_attrs.get("kept_fraction"),
            "seconds": t.user_attrs.get("seconds"),
            "samples_run": t.user_attrs.get("samples_run", 0),
            "origin": t.user_attrs.get(ORIGIN_ATTR) or _legacy_origin(t.user_attrs),
            "worker": t.user_attrs.get("worker"),
            "error": t.user_attrs.get(ERROR_ATTR) or t.user_attrs.get("litepatch.interrupted"),
            "value": t.value,
        })
    return rows


def _legacy_origin(attrs: dict) -> str:
    """Origin of a trial of a study made before trials recorded it."""
    return "seed" if attrs.get("seeded") else "bisect" if attrs.get("bisect") else "sampler"


def _verdict(row: dict) -> str:
    """The 'within budget' cell: yes, no, or why the trial did not finish."""
    if row["state"] == "COMPLETE":
        return "yes" if row["feasible"] else "no"
    error = row.get("error")
    return f"{row['state'].lower()}: {error}" if error else row["state"].lower()


def plots_available() -> bool:
    """Whether matplotlib can be imported (the PNG plots need it; ``pip install 'litepatch[plot]'``)."""
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


NO_PLOTS = "matplotlib is not installed: the report is written without its PNG plots (pip install 'litepatch[plot]')"


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return format(value, spec)
    return str(value)


@dataclass
class CalibrationReport:
    """What a calibration did and measured; :meth:`to_markdown` and :meth:`save` render it."""

    budget: str
    objective: str
    study_name: str
    storage: str
    sampler: str
    layers: list[str]
    plan: dict
    trials: list[dict]
    best_trial: int
    held_out: list[dict]
    held_out_is_calibration: bool
    per_layer_threshold: dict[str, float | None]
    per_layer_kept: dict[str, float]
    per_step_kept: dict[int, float]
    dense_seconds: float
    patched_seconds: float
    generations: dict[str, int]
    held_out_generations: int
    hardware: str
    recipe: Any = None
    extra: dict = field(default_factory=dict)
    made_dense: dict[str, float] = field(default_factory=dict)  # layer -> kept fraction of its kernel calls

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.patched_seconds if self.patched_seconds else float("nan")

    @property
    def best(self) -> dict:
        return next(r for r in self.trials if r["number"] == self.best_trial)

    def trials_to_best(self) -> int:
        """Finished trials up to and including the chosen one."""
        return sum(1 for r in self.trials if r["number"] <= self.best_trial and r["state"] == "COMPLETE")

    def held_out_worst(self, metric: str) -> float | None:
        from .metrics import get_metric

        values = [r[metric] for r in self.held_out if metric in r]
        if not values:
            return None
        return min(values) if get_metric(metric).higher_is_better else max(values)

    def held_out_skipped(self) -> float:
        return 1.0 - sum(r["kept_fraction"] for r in self.held_out) / len(self.held_out)

    def to_markdown(self) -> str:
        best = self.best
        which = "calibration samples (no held-out given)" if self.held_out_is_calibration else "held-out samples"
        lines = [
            f"# Calibration report: `{self.study_name}`",
            "",
            f"* budget: `{self.budget}` (must hold on every calibration sample); objective: {self.objective}",
            f"* storage: `{self.storage}`; sampler: {self.sampler}; hardware: {self.hardware}",
            f"* trials: {len([r for r in self.trials if r['state'] == 'COMPLETE'])} finished, "
            f"{sum(r['feasible'] for r in self.trials)} within budget; chosen: trial #{self.best_trial} "
            f"(found after {self.trials_to_best()} trials)",
            f"* cost: {self.generations['total']} generations ({self.generations['dense']} dense, "
            f"{self.generations['sensitivity']} sensitivity, {self.generations['trials']} in trials) "
            f"+ {self.held_out_generations} for the final check",
            f"* chosen recipe on {which}: "
            + ", ".join(f"{m} {_fmt(self.held_out_worst(m))}" for m in ("psnr", "ssim", "rel_l2")
                        if self.held_out_worst(m) is not None)
            + f" (worst sample), {self.held_out_skipped():.1%} of attention tiles skipped, "
            f"{self.patched_seconds:.3g} s vs {self.dense_seconds:.3g} s dense ({self.speedup:.2f}x)",
            *([f"* made dense in the recipe, since their kernel calls in the chosen trial computed nearly every tile "
               "(the dense kernel is faster there): "
               + ", ".join(f"`{name}` ({kept:.1%})" for name, kept in self.made_dense.items())]
              if self.made_dense else []),
            "",
            "## Chosen parameters",
            "",
            "| parameter | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(v)} |" for k, v in best["params"].items()),
            "",
            "## Final check",
            "",
            "| sample | psnr | ssim | rel_l2 | skipped | seconds |",
            "|---|---|---|---|---|---|",
            *(f"| `{json.dumps(r['sample'], default=repr)}` | {_fmt(r.get('psnr'))} | {_fmt(r.get('ssim'))} | "
              f"{_fmt(r.get('rel_l2'))} | {1 - r['kept_fraction']:.1%} | {_fmt(r['seconds'])} |"
              for r in self.held_out),
            "",
            "## Per layer",
            "",
            "| layer | sensitivity offset | threshold | kept |",
            "|---|---|---|---|",
        ]
        offsets = dict(zip(self.plan["layers"], self.plan["offsets"]))
        for name in self.layers:
            t = self.per_layer_threshold.get(name)
            lines.append(f"| `{name}` | {offsets.get(name, 0):+.2f} | {'dense' if t is None else _fmt(t)} | "
                         f"{_fmt(self.per_layer_kept.get(name), '.1%')} |")
        metric_names = list(self.trials[0]["metrics"]) if self.trials and self.trials[0]["metrics"] else []
        lines += [
            "",
            "## Trials",
            "",
            "| # | origin | params | " + " | ".join(metric_names) + " | kept | seconds | samples | within budget |",
            "|---|---|---|" + "---|" * len(metric_names) + "---|---|---|---|",
        ]
        for r in self.trials:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
            mark = " **(chosen)**" if r["number"] == self.best_trial else ""
            lines.append(
                f"| {r['number']}{mark} | {r['origin']} | {params} | "
                + " | ".join(_fmt(r["metrics"].get(m)) for m in metric_names)
                + f" | {_fmt(r['kept_fraction'], '.1%')} | {_fmt(r['seconds'])} | {r['samples_run']} | "
                f"{_verdict(r)} |"
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("recipe", None)
        data["per_step_kept"] = {str(k): v for k, v in self.per_step_kept.items()}
        return data

    def save(self, directory: str | Path, *, plots: bool = True) -> list[Path]:
        """Writes ``report.md``, ``report.json`` and (with matplotlib) the PNG plots; returns the paths.

        Without matplotlib the plots are skipped with a warning: a finished calibration never fails on them.
        """
        import warnings

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / "report.md", directory / "report.json"]
        paths[0].write_text(self.to_markdown(), encoding="utf-8")
        paths[1].write_text(json.dumps(self.to_dict(), indent=1, default=repr), encoding="utf-8")
        if plots and not plots_available():
            warnings.warn(NO_PLOTS, RuntimeWarning, stacklevel=2)
        elif plots:
            paths += self.plot(directory)
        return paths

    def plot(self, directory: str | Path) -> list[Path]:
        """The three PNG plots; needs matplotlib (``pip install litepatch[plot]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("the calibration plots need matplotlib: pip install 'litepatch[plot]'") from err
        directory = Path(directory)
        out = []
        metric = self.budget.split()[0]
        x_key = "seconds" if self.objective == "time" else "kept_fraction"
        x_label = "seconds per generation" if self.objective == "time" else "kept fraction of attention tiles"

        fig, ax = plt.subplots(figsize=(6, 4))
        for feasible, colour, label in ((True, "tab:blue", "within budget"), (False, "tab:red", "breaks budget")):
            pts = [(r[x_key], r["metrics"].get(metric)) for r in self.trials
                   if r["feasible"] == feasible and r[x_key] is not None and r["metrics"].get(metric) is not None]
            pts = [(x, y if math.isfinite(y) else None) for x, y in pts]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.scatter(*zip(*pts), c=colour, label=label, s=20, alpha=0.8)
        best = self.best
        if best["metrics"].get(metric) is not None and math.isfinite(best["metrics"][metric]):
            ax.scatter([best[x_key]], [best["metrics"][metric]], marker="*", s=200, c="gold", edgecolors="k",
                       label=f"chosen (#{best['number']})", zorder=5)
        try:
            bound = float(self.budget.split()[2])
            first = self.budget.split(" and ")[0]
            ax.axhline(bound, color="grey", linestyle="--", linewidth=1, label=f"budget {first}")
        except (IndexError, ValueError):
            pass
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"worst-sample {metric}")
        ax.set_title("quality vs speed, all trials")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(directory / "quality_vs_time.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)

        fig, ax1 = plt.subplots(figsize=(max(6, 0.35 * len(self.layers)), 4))
        idx = list(range(len(self.layers)))
        thresholds = [self.per_layer_threshold.get(n) for n in self.layers]
        ax1.bar(idx, [t if t is not None else 0 for t in thresholds],
                color=["lightgrey" if t is None else "tab:blue" for t in thresholds], label="threshold (grey: dense)")
        ax1.set_ylabel("threshold (log2)")
        ax1.set_xlabel("layer")
        ax1.set_xticks(idx, [str(i) for i in idx])
        ax2 = ax1.twinx()
        ax2.plot(idx, [1 - self.per_layer_kept.get(n, 1.0) for n in self.layers], "o-", c="tab:orange",
                 label="skipped fraction")
        ax2.set_ylabel("skipped fraction of tiles")
        ax2.set_ylim(0, 1)
        fig.legend(loc="lower left", fontsize=8)
        ax1.set_title("per-layer threshold and sparsity (chosen recipe)")
        fig.tight_layout()
        out.append(directory / "layers.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = sorted(self.per_step_kept)
        ax.plot(steps, [1 - self.per_step_kept[s] for s in steps], "o-")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("skipped fraction of tiles")
        ax.set_ylim(0, 1)
        ax.set_title("sparsity per step (chosen recipe)")
        fig.tight_layout()
        out.append(directory / "steps.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
        return out
