"""Print the README's ablation tables from results/ablation/{cells,seeds}/table.json.

    python results/ablation/readme_tables.py

Numbers are copied from the JSON the runs wrote (percent, two decimals); nothing is computed
here except means, sample standard deviations (as in dcamkd.ablate.summarize) and differences.
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def _desc(c):
    if "preset" in c:
        return {"stfpm": "none / channel CD / none",
                "dcam-paper": "channel / channel CD / spatial KD `sum_c`"}[c["preset"]]
    cos = {"channel": "channel CD", "spatial": "spatial CD", "none": "none"}[c.get("cos", "channel")]
    kl = {"spatial": "spatial KD", "channel": "channel KD", "none": "none"}[c.get("kl", "spatial")]
    extra = [f"{k} {c[k]}" for k in ("tau", "lambda_kl", "dcam_at_inference") if k in c]
    return f"{c['dcam']} / {cos} / {kl}" + (f" ({', '.join(extra)})" if extra else "")


def grid_table(path):
    t = json.loads(path.read_text())
    cfg = {c["name"]: c for c in t["grid"]["cells"]}
    print("| cell | DCAM / cosine / KL | image AUROC | pixel AUROC | AUPRO | magnetic_tile image AUROC "
          "| KL share of grad | channel gates < 0.05 (L1 / L2 / L3) | spatial gates < 0.05 (L1 / L2 / L3) "
          "| val raw / gated | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in t["grid"]["cells"]:
        name = c["name"]
        r = t["rows"].get(name)
        if r is None:
            print(f"| `{name}` | {_desc(cfg[name])} | not run | | | | | | | | |")
            continue
        d = r.get("diagnostics") or {}
        gates, sgates = (" / ".join(f"{100 * d[f'{kind}_lt_0.05_l{i}']:.0f} %" for i in (1, 2, 3)
                                    if f"{kind}_lt_0.05_l{i}" in d) or "-"
                         for kind in ("channel_gate", "spatial_gate"))
        share = d.get("grad_share_kl")
        val = f"{d['val_raw']:.3f}" + (f" / {d['val_gated']:.3f}" if d.get("val_gated") is not None else "")
        mt = r["per_category"].get("magnetic_tile", {}).get("image_auroc") or []
        print(f"| `{name}` | {_desc(cfg[name])} | {_pct(r['mean_image_auroc'])} | {_pct(r['mean_pixel_auroc'])} "
              f"| {_pct(r['mean_aupro'])} | {_pct(float(np.mean(mt)) if mt else None)} "
              f"| {'-' if share is None else f'{100 * share:.0f} %'} | {gates} | {sgates} | {val} "
              f"| {np.mean(r['train_seconds']):.0f} |")


def seeds_table(path):
    t = json.loads(path.read_text())
    rows = t["rows"]
    base = rows.get("stfpm")
    print("| cell | seeds | image AUROC | pixel AUROC | AUPRO | bottle / magnetic_tile / metal_plate image AUROC "
          "| image AUROC − stfpm | AUPRO − stfpm | train s per run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in t["grid"]["cells"]:
        r = rows.get(c["name"])
        if r is None:
            continue

        def ms(k):
            s = r.get(f"std_{k}")
            return f"{100 * r[f'mean_{k}']:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")

        cats = " / ".join(f"{100 * np.mean(r['per_category'][cat]['image_auroc']):.2f}"
                          for cat in t["categories"])
        dl = lambda k: "-" if c["name"] == "stfpm" or base is None else f"{100 * (r[f'mean_{k}'] - base[f'mean_{k}']):+.2f}"
        print(f"| `{c['name']}` | {len(r['seeds'])} | {ms('image_auroc')} | {ms('pixel_auroc')} | {ms('aupro')} "
              f"| {cats} | {dl('image_auroc')} | {dl('aupro')} | {np.mean(r['train_seconds']):.0f} |")


if __name__ == "__main__":
    print("Grid (500 steps, seed 0):\n")
    grid_table(HERE / "table.json")
    if (HERE / "seeds" / "table.json").is_file():
        print("\nSeeds (1,000 steps):\n")
        seeds_table(HERE / "seeds" / "table.json")
