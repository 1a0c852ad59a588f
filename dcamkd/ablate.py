"""The ablation runner (``dcamkd ablate``): a grid of full train + test runs, resumable.

A grid file (YAML) names the settings shared by every cell and the cells themselves:

.. code-block:: yaml

    common:            # TrainConfig fields shared by every cell (same data, seed, batch size,
      backbone: tf_efficientnet_lite0   # learning rate and optimiser-step budget)
      steps: 500
      batch_size: 8
      lr: 0.1
      kd_reduction: mean_c
    seeds: [0]         # default seeds of every cell
    cells:
      - name: stfpm
        preset: stfpm
      - name: ch-ccd-skd
        dcam: channel      # no preset: starts from dcam-paper, then these overrides
        kd_reduction: mean_c
        seeds: [0, 1, 2]   # per-cell override

A cell without ``preset`` starts from ``dcam-paper`` (the literal reference, which never changes,
so a grid file keeps its meaning when the recommended ``dcam`` preset moves); cells whose
objective differs from their preset are recorded as preset ``custom``.

Each cell and seed trains into ``OUT/cells/<name>/seed<k>/`` and is tested into its
``results.json``; a finished run (``results.json`` present) is skipped, an interrupted one
resumes from its ``last.pt``, so a grid spread over several sessions or machines picks up where
it stopped. After every run the tables ``OUT/table.md`` and ``OUT/table.json`` are rewritten
(per category and mean of image AUROC, pixel AUROC and AUPRO; mean and standard deviation over
seeds). Nothing in the runner depends on the device: ``--device cuda`` runs it on a GPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import InvalidArgumentError, MissingFileError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["load_grid", "expand_grid", "run_grid", "summarize", "compare_cells", "compare_md",
           "make_compact_copy", "TABLE_KEYS"]

TABLE_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def _GridLoader():
    """PyYAML's safe loader, also reading ``1e-3`` and ``5e+2`` as floats (YAML 1.1 reads
    exponent notation without a dot as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a grid file; raises :class:`MissingFileError` /
    :class:`InvalidArgumentError` naming the file and the bad entry."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--grid: no such file: {path}")
    try:
        grid = yaml.load(path.read_text(), Loader=_GridLoader())
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"--grid {path}: not valid YAML: {e}") from e
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list) or not grid["cells"]:
        raise InvalidArgumentError(f"--grid {path}: expected a mapping with a non-empty 'cells' list")
    names = set()
    for i, c in enumerate(grid["cells"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise InvalidArgumentError(f"--grid {path}: cell {i} needs a 'name'")
        if c["name"] in names:
            raise InvalidArgumentError(f"--grid {path}: cell name {c['name']!r} is used twice")
        if any(ch in c["name"] for ch in "/\\ "):
            raise InvalidArgumentError(f"--grid {path}: cell name {c['name']!r} must not contain '/', '\\\\' or spaces")
        names.add(c["name"])
    expand_grid(grid, data="", warn=False)  # validates every cell's config
    return grid


def expand_grid(grid: dict[str, Any], data: str, device: Optional[str] = None,
                warn: bool = True) -> list[tuple[str, int, Any]]:
    """``[(cell name, seed, TrainConfig)]`` for every cell and seed of ``grid``. With ``warn``,
    a setting a cell gives (itself or through ``common``) that its config ignores draws one
    warning naming the cell (see :func:`dcamkd.config.preset_config`)."""
    import warnings

    from .config import preset_config

    common = dict(grid.get("common") or {})
    default_seeds = grid.get("seeds") or [common.pop("seed", 0)]
    common.pop("seed", None)
    runs = []
    for c in grid["cells"]:
        c = dict(c)
        name = c.pop("name")
        seeds = c.pop("seeds", None) or default_seeds
        preset = c.pop("preset", "dcam-paper")
        for seed in seeds:
            kw = {**common, **c, "data": data, "seed": int(seed)}
            if device is not None:
                kw["device"] = device
            try:  # a cell that leaves its preset's objective is recorded as 'custom'
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    cfg = preset_config(preset, **kw)
            except (InvalidArgumentError, TypeError) as e:
                raise InvalidArgumentError(f"grid cell {name!r}: {e}") from e
            if warn and seed == seeds[0]:  # once per cell, not per seed
                for w in caught:
                    warnings.warn(f"grid cell {name!r}: {w.message}", w.category, stacklevel=2)
            runs.append((name, int(seed), cfg))
    return runs


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * float(np.mean(vals)):.2f} ± {100 * float(np.std(vals, ddof=1)):.2f}"


def _mean(vals: list) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _diagnostics(cell_dir: Path, per_seed: dict[str, Any]) -> dict[str, Any]:
    """Diagnostics of a cell at the end of training, averaged over its seeds: the KL term's
    share of the student's gradient norm and the cosine between the two terms' gradients; per
    level, the fraction of channel / spatial gates below 0.05 and above 0.95; the final
    cosine and KL terms per level; the validation score of the raw and of the gated student
    (method.md section 3); the step of ``best.pt``."""
    acc: dict[str, list] = {}

    def add(key, val):
        acc.setdefault(key, []).append(val)

    for seed, res in per_seed.items():
        d = res.get("final_diagnostics") or {}
        add("grad_share_kl", d.get("grad_share_kl"))
        add("grad_cosine_cos_kl", d.get("grad_cosine_cos_kl"))
        for kind in ("channel_gate", "spatial_gate"):
            for i, st in enumerate(d.get(kind) or []):
                add(f"{kind}_lt_0.05_l{i + 1}", st.get("frac_lt_0.05"))
                add(f"{kind}_gt_0.95_l{i + 1}", st.get("frac_gt_0.95"))
        log_path = cell_dir / seed / "log.json"
        if log_path.is_file():
            epochs = json.loads(log_path.read_text()).get("epochs") or []
            if epochs:
                last = epochs[-1]
                add("val_raw", last.get("val_raw", last.get("val_score")))
                add("val_gated", last.get("val_gated"))
                for i, v in enumerate(last.get("cos_terms") or []):
                    add(f"cos_l{i + 1}", v)
                for i, v in enumerate(last.get("kl_terms") or []):
                    add(f"kl_l{i + 1}", v)
                best = min(epochs, key=lambda e: e.get("val_score", float("inf")))
                add("best_step", best.get("step"))
    return {k: _mean(v) for k, v in acc.items()}


def _diagnostics_md(rows: dict[str, Any]) -> str:
    def f(v, pct=False):
        if v is None:
            return "-"
        return f"{100 * v:.0f} %" if pct else f"{v:.3g}"

    head = ["cell", "KL share of grad", "cos(grad cos, grad KL)", "channel gates < 0.05 (per level)",
            "spatial gates < 0.05 (per level)", "cos terms (per level)", "val raw / gated", "best step"]
    lines = ["Diagnostics at the end of training (mean over seeds):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows.items():
        d = e.get("diagnostics") or {}
        def levels(prefix, pct=True):
            vals, i = [], 1
            while f"{prefix}_l{i}" in d:
                vals.append(f(d[f"{prefix}_l{i}"], pct))
                i += 1
            return " / ".join(vals) or "-"

        gated = d.get("val_gated")
        lines.append("| " + " | ".join([
            name, f(d.get("grad_share_kl"), pct=True), f(d.get("grad_cosine_cos_kl")),
            levels("channel_gate_lt_0.05"), levels("spatial_gate_lt_0.05"), levels("cos", pct=False),
            f"{f(d.get('val_raw'))} / {f(gated)}" if gated is not None else f(d.get("val_raw")),
            f(d.get("best_step")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _row_scoring(per_seed: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct scorings (fusion, blur sigma, image score, top-k fraction: None with the
    maximum, which reads none) its runs were tested with, as recorded in each run's config; one
    entry when the cell is consistent."""
    from dataclasses import fields

    from .config import IGNORED_UNDER
    from .objective import ScoringSettings

    keys = [f.name for f in fields(ScoringSettings)]
    seen: list[dict[str, Any]] = []
    for r in per_seed.values():
        sc = {k: (r.get("config") or {}).get(k) for k in keys}
        for key, dep, off in IGNORED_UNDER:  # a setting its rule does not read (the maximum reads no fraction)
            if key in sc and sc.get(dep) in off:
                sc[key] = None
        if sc not in seen:
            seen.append(sc)
    return seen


def summarize(out_dir: str | os.PathLike, grid: dict[str, Any]) -> dict[str, Any]:
    """Collect every finished run under ``out_dir`` into ``table.json`` and ``table.md``.

    Runners sharing ``out_dir`` summarise one at a time (an exclusive lock on
    ``OUT/.table.lock`` around reading the results and writing the tables), so a summary that
    read fewer runs never overwrites one that read more."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".table.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _summarize(out, grid)


def _summarize(out: Path, grid: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    cats: list[str] = []
    for c in grid["cells"]:
        name = c["name"]
        per_seed = {}
        for rpath in sorted((out / "cells" / name).glob("seed*/results.json")):
            res = json.loads(rpath.read_text())
            per_seed[rpath.parent.name] = res
            for cat in res["per_category"]:
                if cat not in cats:
                    cats.append(cat)
        if not per_seed:
            continue
        entry: dict[str, Any] = {"seeds": sorted(per_seed), "config": {k: v for k, v in c.items()}}
        for k in TABLE_KEYS:
            means = [r["mean"][k] for r in per_seed.values() if r["mean"].get(k) is not None]
            entry[f"seed_{k}"] = means
            entry[f"mean_{k}"] = float(np.mean(means)) if means else None
            entry[f"std_{k}"] = float(np.std(means, ddof=1)) if len(means) > 1 else None
            last = [r["last"]["mean"][k] for r in per_seed.values()
                    if "last" in r and r["last"]["mean"].get(k) is not None]
            if last:
                entry[f"last_seed_{k}"] = last
                entry[f"last_mean_{k}"] = float(np.mean(last))
                entry[f"last_std_{k}"] = float(np.std(last, ddof=1)) if len(last) > 1 else None
            for cat in cats:
                vals = [r["per_category"][cat][k] for r in per_seed.values()
                        if cat in r["per_category"] and r["per_category"][cat].get(k) is not None]
                entry.setdefault("per_category", {}).setdefault(cat, {})[k] = vals
        entry["train_seconds"] = [r.get("train_seconds") for r in per_seed.values()]
        entry["scoring"] = _row_scoring(per_seed)
        entry["diagnostics"] = _diagnostics(out / "cells" / name, per_seed)
        rows[name] = entry
    table = {"grid": grid, "categories": cats, "rows": rows}
    atomic_write_json(out / "table.json", table)
    head = ["cell", "seeds"] + [f"mean {k}" for k in TABLE_KEYS] + [f"{cat} {k}" for cat in cats for k in TABLE_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows.items():
        cells = [name, str(len(e["seeds"]))]
        for k in TABLE_KEYS:
            if e[f"std_{k}"] is not None:
                cells.append(f"{100 * e[f'mean_{k}']:.2f} ± {100 * e[f'std_{k}']:.2f}")
            else:
                cells.append("-" if e[f"mean_{k}"] is None else f"{100 * e[f'mean_{k}']:.2f}")
        for cat in cats:
            for k in TABLE_KEYS:
                cells.append(_fmt(e["per_category"].get(cat, {}).get(k, [])))
        lines.append("| " + " | ".join(cells) + " |")
    last_lines = []
    for name, e in rows.items():
        if f"last_mean_{TABLE_KEYS[0]}" in e:
            vals = [_pm(e.get(f"last_mean_{k}"), e.get(f"last_std_{k}")) for k in TABLE_KEYS]
            last_lines.append(f"| {name} | {len(e[f'last_seed_{TABLE_KEYS[0]}'])} | " + " | ".join(vals) + " |")
    if last_lines:
        last_md = ("\n**last.pt** (end of the schedule; the table above tests best.pt, the best validation step)\n\n"
                   "| cell | seeds | " + " | ".join(f"mean {k}" for k in TABLE_KEYS) + " |\n"
                   + "|---|---|" + "---|" * len(TABLE_KEYS) + "\n" + "\n".join(last_lines) + "\n")
    else:
        last_md = ""
    md = ("Values in percent; with several seeds, mean ± sample standard deviation over seeds.\n\n"
          + "\n".join(lines) + "\n" + last_md + "\n" + _diagnostics_md(rows))
    atomic_write_text(out / "table.md", md)
    return table


def plot_curves(out_dir: str | os.PathLike, grid: dict[str, Any], path: Optional[str | os.PathLike] = None,
                cells: Optional[list[str]] = None, seed: str = "seed0") -> Optional[Path]:
    """Draw the training curves of every finished cell (one seed) from its ``log.json`` into one
    figure (default ``OUT/curves.png``; ``.svg`` and ``.pdf`` names work too), written atomically; returns its path, or None when no cell
    has a log. Panels, against the optimiser step: the cosine term and the KL term (sums over
    the pyramid levels, unweighted), the KL term's share of the student's gradient norm, the
    fraction of channel gates below 0.05 at level 1 and at the level with the most closed gates,
    and the validation score of the raw (solid) and of the gated (dashed) student."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    names = cells or [c["name"] for c in grid["cells"]]
    logs = {}
    for name in names:
        lp = out / "cells" / name / seed / "log.json"
        if lp.is_file():
            logs[name] = json.loads(lp.read_text()).get("epochs") or []
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    cmap = plt.get_cmap("tab20")
    for i, (name, eps) in enumerate(logs.items()):
        col = cmap(i % 20)
        step = [e["step"] for e in eps]
        kw = dict(color=col, label=name, lw=1.4)
        axes[0, 0].plot(step, [sum(e.get("cos_terms") or [0]) for e in eps], **kw)
        kl = [sum(e.get("kl_terms") or [0]) for e in eps]
        if any(v > 0 for v in kl):
            axes[0, 1].plot(step, kl, **kw)
        share = [(e.get("diagnostics") or {}).get("grad_share_kl") for e in eps]
        if any(v for v in share if v is not None):
            axes[0, 2].plot(step, [np.nan if v is None else v for v in share], **kw)
        gates = [(e.get("diagnostics") or {}).get("channel_gate") for e in eps]
        if any(gates):
            axes[1, 0].plot(step, [g[0]["frac_lt_0.05"] if g else np.nan for g in gates], **kw)
            axes[1, 1].plot(step, [max(st["frac_lt_0.05"] for st in g) if g else np.nan for g in gates], **kw)
        axes[1, 2].plot(step, [e.get("val_raw", e.get("val_score")) for e in eps], **kw)
        if any(e.get("val_gated") is not None for e in eps):
            axes[1, 2].plot(step, [e.get("val_gated", np.nan) for e in eps], color=col, lw=1.0, ls="--")
    titles = ["cosine term (sum over levels)", "KL term (sum over levels)", "KL share of the student's gradient norm",
              "level-1 channel gates < 0.05 (fraction)", "most-closed level: channel gates < 0.05",
              "validation score: raw (solid) / gated (dashed)"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0, 1].set_yscale("log")
    handles, labels = axes[1, 2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    target = Path(path) if path else out / "curves.png"
    fmt = target.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "svg", "pdf"):
        raise InvalidArgumentError(f"path: expected a .png, .svg or .pdf file name, got {str(target)!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=90)
    plt.close(fig)
    return atomic_write_bytes(target, buf.getvalue())


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def compare_cells(table: str | os.PathLike | dict[str, Any], a: str, b: str,
                  keys: tuple[str, ...] = ("image_auroc", "aupro")) -> dict[str, Any]:
    """One-sided Welch t-test of "cell ``b`` scores higher than cell ``a``" over seeds.

    Args:
        table: ``table.json`` of :func:`summarize` (path or loaded dict).
        a, b: cell names (baseline, challenger).
        keys: metrics compared (means over categories of each seed's run).

    Returns:
        ``{"a", "b", "rows": [{"checkpoint": "best"|"last", "metric", "n_a", "n_b", "mean_a",
        "mean_b", "diff", "t", "p"}], "warnings": [...]}``; ``warnings`` names cells whose
        runs were tested with different scorings (a grid that leaves the scoring to presets
        that changed between runs, or cells of presets that score differently); ``p`` is None with fewer than two seeds on a side or
        when neither side varies over its seeds.
        A claimed win needs ``p < 0.05`` on both metrics (the accuracy protocol in docs/).

    Raises:
        MissingFileError / InvalidArgumentError: no such table, or a cell not in it.
    """
    from scipy import stats

    if not isinstance(table, dict):
        path = Path(table)
        if not path.is_file():
            raise MissingFileError(f"--table: no such file: {path}")
        try:
            table = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"--table {path}: not JSON ({e})") from None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), dict):
        raise InvalidArgumentError("--table: expected the table.json of 'dcamkd ablate' (a mapping with 'rows')")
    rows = table["rows"]
    for name in (a, b):
        if name not in rows:
            raise InvalidArgumentError(f"cell {name!r} is not in the table; it has {sorted(rows)}")
    out = []
    for ckpt, prefix in (("best", "seed_"), ("last", "last_seed_")):
        for k in keys:
            xa, xb = rows[a].get(prefix + k), rows[b].get(prefix + k)
            if not xa or not xb:
                continue
            t = p = None
            if len(xa) > 1 and len(xb) > 1 and (np.ptp(xa) > 0 or np.ptp(xb) > 0):  # no spread: no test
                r = stats.ttest_ind(xb, xa, equal_var=False, alternative="greater")
                t, p = float(r.statistic), float(r.pvalue)
            out.append({"checkpoint": ckpt, "metric": k, "n_a": len(xa), "n_b": len(xb),
                        "mean_a": float(np.mean(xa)), "mean_b": float(np.mean(xb)),
                        "diff": float(np.mean(xb) - np.mean(xa)), "t": t, "p": p})
    warnings = []
    sa, sb = rows[a].get("scoring"), rows[b].get("scoring")
    for name, sc in ((a, sa), (b, sb)):
        if sc is not None and len(sc) > 1:
            warnings.append(f"cell {name!r} holds runs tested with different scorings: {sc}")
    if sa is not None and sb is not None and len(sa) == 1 and len(sb) == 1 and sa != sb:
        warnings.append(f"cells {a!r} and {b!r} were tested with different scorings ({sa[0]} against "
                        f"{sb[0]}): their difference mixes the objective with the scoring")
    return {"a": a, "b": b, "rows": out, "warnings": warnings}


def compare_md(cmp: dict[str, Any]) -> str:
    """:func:`compare_cells` as a Markdown table (percent points)."""
    lines = [f"Is {cmp['b']} better than {cmp['a']}? One-sided Welch t-test over seeds.", "",
             "| checkpoint | metric | seeds a/b | a | b | b - a | t | p |", "|---|---|---|---|---|---|---|---|"]
    lines[1:1] = [f"Warning: {w}" for w in cmp.get("warnings", [])]
    for r in cmp["rows"]:
        t = "-" if r["t"] is None else f"{r['t']:.2f}"
        p = "-" if r["p"] is None else f"{r['p']:.3f}"
        lines.append(f"| {r['checkpoint']} | {r['metric']} | {r['n_a']}/{r['n_b']} | {100 * r['mean_a']:.2f} | "
                     f"{100 * r['mean_b']:.2f} | {100 * r['diff']:+.2f} | {t} | {p} |")
    return "\n".join(lines) + "\n"


def run_grid(grid_path: str | os.PathLike, data: str, out_dir: str | os.PathLike, device: Optional[str] = None,
             only: Optional[list[str]] = None, progress: bool = True, max_runs: Optional[int] = None,
             seeds: Optional[list[int]] = None, save_maps: bool = False) -> dict[str, Any]:
    """Run every unfinished cell of a grid; returns the summary table (see :func:`summarize`)
    and draws ``OUT/curves.png`` (see :func:`plot_curves`).

    Args:
        grid_path: the YAML grid file.
        data: dataset root in MVTec AD layout.
        out_dir: output folder (created); ``OUT/grid.yaml`` keeps a copy of the grid.
        device: overrides the grid's device.
        only: run just these cell names, in this order.
        max_runs: stop after this many runs (to fit a session); the rest resumes later.
        seeds: run just these seeds of each cell.
        save_maps: keep each run's test maps of ``best.pt`` in ``RUN/maps/<category>.npz``,
            unblurred whatever the cell's blur (:mod:`dcamkd.rescore` chooses the blur and image
            score from them).

    Several runners may share ``out_dir`` (processes on one machine): a run that another
    runner holds (an exclusive lock on ``RUN/.lock``) is skipped, not trained twice.
    """
    grid = load_grid(grid_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", Path(grid_path).read_text())
    runs = expand_grid(grid, data, device)
    if only:
        unknown = sorted(set(only) - {r[0] for r in runs})
        if unknown:
            raise InvalidArgumentError(f"--only: unknown cells {unknown}; the grid has {sorted({r[0] for r in runs})}")
        order = {name: i for i, name in enumerate(only)}
        runs = sorted((r for r in runs if r[0] in order), key=lambda r: order[r[0]])  # in the order given
    if seeds is not None:
        runs = [r for r in runs if r[1] in set(seeds)]
    done = 0
    for name, seed, cfg in runs:
        run_dir = out / "cells" / name / f"seed{seed}"
        if (run_dir / "results.json").is_file():
            continue
        if max_runs is not None and done >= max_runs:
            break
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                print(f"[ablate] cell {name} seed {seed}: another runner holds it; skipped", flush=True)
                continue
            if not (run_dir / "results.json").is_file():  # finished while we waited for the lock
                _run_one(name, seed, cfg, run_dir, data, progress, save_maps)
                done += 1
                summarize(out, grid)
    table = summarize(out, grid)
    plot_curves(out, grid)
    return table


def _run_one(name: str, seed: int, cfg, run_dir: Path, data: str, progress: bool, save_maps: bool = False) -> None:
    """Train one cell and seed into ``run_dir`` (resuming an interrupted run), test ``best.pt``
    (the best validation step) and ``last.pt`` (the end of the schedule), write ``results.json``:
    ``best.pt``'s results at the top level, ``last.pt``'s means and per-category metrics under
    ``'last'``, the config, the train time and the last epoch's diagnostics."""
    from .evaluate import run_test
    from .train import train

    print(f"[ablate] cell {name} seed {seed}: training into {run_dir}", flush=True)
    t0 = time.time()
    log = train(cfg, run_dir, resume=(run_dir / "last.pt").is_file(), progress=progress)
    train_s = time.time() - t0
    tmp = run_dir / "results.tmp.json"
    t1 = time.time()
    res = run_test(run_dir / "best.pt", data, tmp, device=cfg.device, quiet=not progress,
                   save_maps=run_dir / "maps" if save_maps else None)
    res["test_seconds"] = time.time() - t1
    last = run_test(run_dir / "last.pt", data, tmp, device=cfg.device, quiet=True)
    res["last"] = {k: last[k] for k in ("mean", "per_category", "checkpoint_step")}
    res["train_seconds"] = train_s
    res["cell"], res["seed"], res["config"] = name, seed, cfg.to_dict()
    res["final_diagnostics"] = log["epochs"][-1].get("diagnostics") if log["epochs"] else None
    atomic_write_json(run_dir / "results.json", res)
    tmp.unlink(missing_ok=True)


def make_compact_copy(src: str | os.PathLike, dst: str | os.PathLike, size: int = 256,
                      quality: int = 95) -> tuple[int, int]:
    """Copy an MVTec-layout dataset at ``size x size``: images as JPEG of ``quality``, masks
    resized bilinearly and binarised at half range (the evaluation rule of method.md section
    7, so evaluation masks are unchanged) as 0/255 PNG, named ``<stem>_mask.png``.

    Returns ``(files written, bytes written)``. The copy of a licensed dataset must stay out of
    version control.
    """
    from PIL import Image

    from .data import list_categories, load_image, load_mask, scan_category

    if size < 16:
        raise InvalidArgumentError(f"--size must be >= 16, got {size}")
    if not 1 <= quality <= 100:
        raise InvalidArgumentError(f"--quality must be in [1, 100], got {quality}")
    src, dst = Path(src), Path(dst)
    n = nbytes = 0
    for cat in list_categories(src):
        train, test = scan_category(src, cat)
        for smp in train + test:
            rel = Path(smp.path).relative_to(src)
            out = (dst / rel).with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            load_image(smp.path).resize((size, size), Image.BILINEAR).save(out, quality=quality)
            n, nbytes = n + 1, nbytes + out.stat().st_size
            if smp.mask_path is not None:
                mrel = Path(smp.mask_path).relative_to(src)
                mout = dst / mrel.parent / f"{out.stem}_mask.png"
                mout.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((load_mask(smp.mask_path, size) * 255).astype(np.uint8)).save(mout)
                n, nbytes = n + 1, nbytes + mout.stat().st_size
    return n, nbytes
