"""Screening tables of the accuracy study under the default and the chosen scoring.

Reads the saved maps of a ``dcamkd ablate --save-maps`` output (``OUT/cells/<cell>/seed<k>/maps``),
rescores every run not yet rescored into ``results/accuracy/rescore/<cell>-seed<k>.json`` (the
4 x 4 grid of ``dcamkd rescore``), chooses the scoring as docs/accuracy-protocol.md says (the
(sigma, rule) with the highest mean of image AUROC and AUPRO over every screening run of A0 and
C0), and writes ``results/accuracy/screening-rescored.md`` and ``.json``: per cell, mean and
standard deviation over seeds of image AUROC and AUPRO (best.pt) under the default scoring (no
blur, map maximum) and under the chosen one, the difference to the arm's base and the one-sided
Welch p of :func:`dcamkd.ablate.compare_cells`.

    python results/accuracy/tables.py --runs runs/accuracy/screening
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from dcamkd.ablate import compare_cells
from dcamkd.io import atomic_write_json, atomic_write_text
from dcamkd.rescore import choose_scoring, mean_over_runs, parse_rules, rescore_runs, rescore_table_md

HERE = Path(__file__).resolve().parent
SIGMAS = (0.0, 2.0, 4.0, 8.0)
RULES = "max,topk:0.001,topk:0.01,topk:0.05"
DEFAULT = ("sigma=0", "max")
CHOICE_CELLS = ("A0", "C0")  # the protocol chooses the scoring on these cells' screening runs


def base_of(cell: str) -> str | None:
    """The base a screening cell is judged against: A-* -> A0, C-* -> C0, B0 -> C0 (as 'C0 against
    B0' reads 'what DCAM adds'); the bases A0 and C0 have none."""
    if cell == "B0":
        return "C0"
    m = re.match(r"^([AC])-", cell)
    return f"{m.group(1)}0" if m else None


def rescored_runs(runs_dir: Path, rescore_dir: Path) -> dict[str, dict[int, dict]]:
    """{cell: {seed: rescore JSON}}, rescoring the runs whose JSON is missing."""
    out: dict[str, dict[int, dict]] = {}
    for maps in sorted(runs_dir.glob("cells/*/seed*/maps")):
        m = re.fullmatch(r"seed(\d+)", maps.parent.name)
        if m is None or not (maps.parent / "results.json").is_file():
            continue  # not a run folder, or still running
        cell, seed = maps.parent.parent.name, int(m.group(1))
        js = rescore_dir / f"{cell}-seed{seed}.json"
        source = source_of(maps)
        cached = json.loads(js.read_text()) if js.is_file() else None
        if cached is None or cached.get("source") != source:  # never reuse another run's numbers
            res = rescore_runs([maps], SIGMAS, parse_rules(RULES))
            rel = str(maps.relative_to(runs_dir))  # name the run inside the --runs folder
            res["runs"], res["per_run"] = [rel], {rel: res["per_run"][str(maps)]}
            res["source"] = source
            atomic_write_json(js, res)
            atomic_write_text(js.with_suffix(".md"), rescore_table_md(res))
            print(f"rescored {cell} seed {seed}")
            cached = res
        out.setdefault(cell, {})[seed] = cached
    return out


def source_of(maps: Path) -> dict:
    """What a cached rescore was made from: the maps' files (name, size, modification time in
    whole seconds) and the grid; a cache entry is reused only when all of it matches."""
    files = sorted(maps.glob("*.npz"))
    return {"files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files],
            "sigmas": list(SIGMAS), "rules": RULES}


def value(res: dict, key: tuple[str, str]) -> tuple[float, float]:
    e = res["mean"][key[0]]
    return e["image_auroc"][key[1]], e["aupro"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="--out folder of 'dcamkd ablate --save-maps'")
    ap.add_argument("--rescore-dir", default=str(HERE / "rescore"))
    ap.add_argument("--out", default=str(HERE / "screening-rescored"))
    a = ap.parse_args()
    runs = rescored_runs(Path(a.runs), Path(a.rescore_dir))

    # the choice: mean over the A0 and C0 runs of each run's category mean, then choose_scoring
    pool = [r for c in CHOICE_CELLS for r in runs.get(c, {}).values()]
    if not pool:
        raise SystemExit(f"no rescored run of {CHOICE_CELLS} under {a.runs}")
    choice = choose_scoring(mean_over_runs(pool))
    chosen = (f"sigma={choice['sigma']:g}", choice["rule"])

    table: dict = {"choice": {**choice, "runs": len(pool)}, "rows": {}}
    for scoring_name, key in (("default", DEFAULT), ("chosen", chosen)):
        rows = {}
        for cell, seeds in runs.items():
            vals = [value(seeds[s], key) for s in sorted(seeds)]
            rows[cell] = {"seeds": sorted(seeds), "seed_image_auroc": [v[0] for v in vals],
                          "seed_aupro": [v[1] for v in vals]}
        table["rows"][scoring_name] = rows

    order = [c for c in ("A0", "B0", "C0") if c in runs] + sorted(c for c in runs if c not in ("A0", "B0", "C0"))

    def pm(xs):
        return f"{100 * np.mean(xs):.2f}" + (f" ± {100 * np.std(xs, ddof=1):.2f}" if len(xs) > 1 else "")

    lines = [f"Scoring chosen over {len(pool)} runs of {' and '.join(CHOICE_CELLS)}: sigma {choice['sigma']:g}, "
             f"{choice['rule']} (mean image AUROC {100 * choice['image_auroc']:.2f}, AUPRO "
             f"{100 * choice['aupro']:.2f}); default: sigma 0, max. best.pt, percent, mean ± sample standard "
             "deviation over seeds; differences to the base under the chosen scoring, over the seeds each "
             "side has so far; p: one-sided Welch test of 'better than the base' (none below two seeds a "
             "side).", "",
             "| cell | seeds | image AUROC, default | AUPRO, default | image AUROC, chosen | AUPRO, chosen "
             "| base | image AUROC - base, chosen (p) | AUPRO - base, chosen (p) |",
             "|---|---|---|---|---|---|---|---|---|"]
    cmp_out = {}
    for cell in order:
        d, c = table["rows"]["default"][cell], table["rows"]["chosen"][cell]
        base = base_of(cell)
        diff_cols = ["-", "-"]
        if base in runs:
            # B0 is judged as "does DCAM help": C0 against B0
            a_, b_ = (cell, base) if cell == "B0" else (base, cell)
            cmp = compare_cells({"rows": table["rows"]["chosen"]}, a_, b_)
            cmp_out[cell] = cmp
            best = {r["metric"]: r for r in cmp["rows"] if r["checkpoint"] == "best"}
            diff_cols = [f"{100 * best[m]['diff']:+.2f}" + (f" ({best[m]['p']:.2f})" if best[m]["p"] is not None else "")
                         for m in ("image_auroc", "aupro")]
            base = "C0 against B0 (what DCAM adds)" if cell == "B0" else base
        lines.append(f"| {cell} | {len(c['seeds'])} | {pm(d['seed_image_auroc'])} | {pm(d['seed_aupro'])} | "
                     f"{pm(c['seed_image_auroc'])} | {pm(c['seed_aupro'])} | {base or '-'} | "
                     + " | ".join(diff_cols) + " |")
    table["compare"] = cmp_out
    atomic_write_json(Path(a.out).with_suffix(".json"), table)
    atomic_write_text(Path(a.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
