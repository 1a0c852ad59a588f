"""Tables of the accuracy study's final comparison (docs/accuracy-protocol.md, stage 2).

Reads the output of ``dcamkd ablate --grid results/accuracy/final.yaml --out OUT``, copies each
run's ``results.json`` and ``log.json`` (not its checkpoints) into ``results/accuracy/final/``
with the table ``dcamkd ablate`` wrote, and writes ``results/accuracy/final.md``: per arm the
mean and sample standard deviation over seeds of image AUROC, pixel AUROC and AUPRO for
``best.pt`` and ``last.pt``, per category, the three comparisons of the protocol (C against B:
DCAM's claim; C against A: the project's; B against A) by the one-sided Welch test of
:func:`dcamkd.ablate.compare_cells`, training times and diagnostics.

    python results/accuracy/final_tables.py --runs runs/accuracy/final
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from dcamkd.ablate import TABLE_KEYS, compare_cells
from dcamkd.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ARMS = ("A", "B", "C")
CLAIMS = (("B", "C", "what DCAM adds (DCAM's claim)"), ("A", "C", "the project's claim"),
          ("A", "B", "the spatial KL term without DCAM"))
NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}


def _pm(vals: list[float]) -> str:
    v = 100 * np.asarray(vals, dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def copy_runs(runs: Path, dst: Path) -> None:
    """Copy the table and every run's results.json and log.json (no checkpoints, no maps)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("table.json", "table.md", "grid.yaml", "curves.png"):
        if (runs / name).is_file():
            shutil.copy2(runs / name, dst / name)
    for res in sorted(runs.glob("cells/*/seed*/results.json")):
        out = dst / res.parent.relative_to(runs)
        out.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "log.json"):
            if (res.parent / f).is_file():
                shutil.copy2(res.parent / f, out / f)


def final_md(table: dict) -> str:
    rows = table["rows"]
    arms = [a for a in ARMS if a in rows]
    cats = table["categories"]
    out = ["Final comparison: one multi-class model over industrial3 per run, seeds 10-14 (no choice "
           "was made on them), lite0 teacher, 256 x 256, batch 8, 1,000 SGD steps, blur sigma 4 and "
           "the mean of the top 1 % of the map for every arm. Percent, mean ± sample standard "
           "deviation over seeds; each seed's value is the mean over the three categories.", ""]
    for ckpt, prefix in (("best.pt", "seed_"), ("last.pt", "last_seed_")):
        out += [f"**{ckpt}**", "", "| arm | seeds | " + " | ".join(NAMES[k] for k in TABLE_KEYS) + " |",
                "|---|---|" + "---|" * len(TABLE_KEYS)]
        for a in arms:
            out.append(f"| {a} | {len(rows[a]['seeds'])} | "
                       + " | ".join(_pm(rows[a].get(prefix + k) or []) for k in TABLE_KEYS) + " |")
        out.append("")
    out += ["Per category (best.pt):", "", "| arm | " + " | ".join(f"{c} {NAMES[k]}" for c in cats for k in TABLE_KEYS) + " |",
            "|---|" + "---|" * (len(cats) * len(TABLE_KEYS))]
    for a in arms:
        pc = rows[a].get("per_category", {})
        out.append(f"| {a} | " + " | ".join(_pm(pc.get(c, {}).get(k, [])) for c in cats for k in TABLE_KEYS) + " |")
    out += ["", "Comparisons (one-sided Welch test of 'the second arm scores higher'; a win needs "
            "p < 0.05 on both image AUROC and AUPRO):", "",
            "| comparison | checkpoint | image AUROC diff (p) | AUPRO diff (p) | win |", "|---|---|---|---|---|"]
    for a, b, what in CLAIMS:
        if a not in rows or b not in rows:
            continue
        cmp = compare_cells(table, a, b)
        for ckpt in ("best", "last"):
            r = {x["metric"]: x for x in cmp["rows"] if x["checkpoint"] == ckpt}
            if not {"image_auroc", "aupro"} <= set(r):
                continue
            cells = []
            for k in ("image_auroc", "aupro"):
                p = r[k]["p"]
                cells.append(f"{100 * r[k]['diff']:+.2f} ({'-' if p is None else f'{p:.3f}'})")
            win = all(r[k]["p"] is not None and r[k]["p"] < 0.05 for k in ("image_auroc", "aupro"))
            out.append(f"| {b} against {a}: {what} | {ckpt}.pt | {cells[0]} | {cells[1]} | {'yes' if win else 'no'} |")
        for w in cmp["warnings"]:
            out.append(f"\nWarning: {w}")
    out += ["", "Training time per run (s, two one-thread runs at a time on a 2-core AMD EPYC) and "
            "diagnostics at the last step (means over seeds):", "",
            "| arm | train s | best step | KL share of the gradient | channel gates < 0.05 (l1/l2/l3) | channel gates > 0.95 (l1/l2/l3) |",
            "|---|---|---|---|---|---|"]
    for a in arms:
        d = rows[a].get("diagnostics", {})
        ts = [t for t in rows[a].get("train_seconds", []) if t is not None]
        share = d.get("grad_share_kl")
        lo = "/".join(f"{100 * d[f'channel_gate_lt_0.05_l{i}']:.1f} %" for i in (1, 2, 3)
                      if f"channel_gate_lt_0.05_l{i}" in d) or "-"
        hi = "/".join(f"{100 * d[f'channel_gate_gt_0.95_l{i}']:.1f} %" for i in (1, 2, 3)
                      if f"channel_gate_gt_0.95_l{i}" in d) or "-"
        best = d.get("best_step")
        out.append(f"| {a} | {np.mean(ts):.0f} ({min(ts):.0f}-{max(ts):.0f}) | "
                   f"{'-' if best is None else f'{best:.0f}'} | "
                   f"{'-' if share is None else f'{100 * share:.1f} %'} | {lo} | {hi} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="the --out of 'dcamkd ablate --grid results/accuracy/final.yaml'")
    a = ap.parse_args()
    runs = Path(a.runs)
    if not (runs / "table.json").is_file():
        raise SystemExit(f"--runs {runs}: no table.json (run 'dcamkd ablate' into it first)")
    copy_runs(runs, HERE / "final")
    table = json.loads((runs / "table.json").read_text())
    atomic_write_text(HERE / "final.md", final_md(table))
    print(final_md(table), end="")


if __name__ == "__main__":
    main()
