"""Choose the blur and the image-score rule from saved anomaly maps, without retraining.

``dcamkd test --save-maps DIR`` writes ``DIR/<category>.npz`` (maps, masks, labels, scores, paths
and the scoring settings they were made with, :func:`dcamkd.evaluate.evaluate_category`).
:func:`rescore` reads such files, blurs the maps with each asked sigma, scores every image with
each asked image-score rule (``max`` or the mean of the top-k fraction, method.md section 5) and
returns image AUROC per (sigma, rule) and pixel AUROC and AUPRO per sigma (they do not depend on
the image-score rule), per category and as the mean over categories.

The saved maps must be unblurred (sigma 0): a blur cannot be undone, and composing blurs is exact
only away from the borders. Choosing sigma and k on a test set is fitting them to it: choose on
runs (seeds) other than those that are reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidArgumentError, MissingFileError
from .metrics import aupro, image_auroc, pixel_auroc
from .objective import IMAGE_SCORES, check_sigma
from .scoring import gaussian_blur, image_scores

__all__ = ["parse_rules", "rescore", "rescore_runs", "mean_over_runs", "choose_scoring", "rescore_table_md"]


def parse_rules(text: str) -> list[tuple[str, float]]:
    """``'max,topk:0.01,topk:0.001'`` -> ``[('max', 1.0), ('topk', 0.01), ('topk', 0.001)]``.

    Raises:
        InvalidArgumentError: a rule that is not ``max`` or ``topk:F`` with F in (0, 1].
    """
    rules = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, frac = part.partition(":")
        if name not in IMAGE_SCORES or (name == "max") != (frac == ""):
            raise InvalidArgumentError(f"--rules: expected 'max' or 'topk:FRACTION', got {part!r}")
        try:
            f = float(frac) if frac else 1.0
        except ValueError:
            raise InvalidArgumentError(f"--rules: {part!r}: the fraction is not a number") from None
        if not 0 < f <= 1:
            raise InvalidArgumentError(f"--rules: {part!r}: the fraction must be in (0, 1]")
        rules.append((name, f))
    if not rules:
        raise InvalidArgumentError("--rules: expected at least one rule")
    return rules


def _rule_name(rule: tuple[str, float]) -> str:
    return "max" if rule[0] == "max" else f"topk:{rule[1]:g}"


def _load(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{path}: not a saved-maps file of 'dcamkd test --save-maps' ({e})") from e
    missing = {"maps", "masks", "labels"} - set(d)
    if missing:
        raise InvalidArgumentError(f"{path}: missing arrays {sorted(missing)}; expected a file of "
                                   "'dcamkd test --save-maps'")
    scoring = json.loads(str(d["scoring"])) if "scoring" in d else {}
    if scoring.get("sigma", 0.0) != 0.0:
        raise InvalidArgumentError(f"{path}: maps were saved blurred (sigma {scoring['sigma']:g}, by an older dcamkd "
                                   "before maps were saved unblurred); save them again with 'dcamkd test "
                                   "--save-maps DIR' to choose the blur")
    return d


def rescore(maps_dir: str | os.PathLike, sigmas: Sequence[float], rules: Sequence[tuple[str, float]],
            categories: Optional[Sequence[str]] = None, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Metrics of saved maps under each blur and image-score rule.

    Args:
        maps_dir: folder of ``<category>.npz`` files of ``dcamkd test --save-maps`` (maps
            ``(N, H, W)`` float, masks ``(N, H, W)`` bool, labels ``(N,)``), saved with sigma 0.
        sigmas: Gaussian blur sigmas in pixels of the map (each >= 0).
        rules: image-score rules from :func:`parse_rules`.
        categories: restrict to these files' categories (default: every ``*.npz``).
        fpr_limit: AUPRO integration limit (false-positive rate).

    Returns:
        ``{"categories": [...], "sigmas": [...], "rules": [...], "per_category": {cat: {"sigma=S":
        {"pixel_auroc", "aupro", "image_auroc": {rule: value}}}}, "mean": {same without cat}}``;
        values are fractions in [0, 1].

    Raises:
        MissingFileError: no such folder, or no ``.npz`` file in it (or a named category's file
            is missing). InvalidArgumentError: a bad sigma, or a file that is not unblurred saved maps.
    """
    root = Path(maps_dir)
    if not root.is_dir():
        raise MissingFileError(f"--maps: no such folder: {root}")
    files = sorted(root.glob("*.npz")) if categories is None else [root / f"{c}.npz" for c in categories]
    if not files:
        raise MissingFileError(f"--maps {root}: no <category>.npz files (write them with 'dcamkd test --save-maps')")
    for f in files:
        if not f.is_file():
            raise MissingFileError(f"--maps: no such file: {f}")
    sigmas = [check_sigma(s) for s in sigmas]
    if not sigmas:
        raise InvalidArgumentError("--sigmas: expected at least one sigma")
    if len({f"{s:g}" for s in sigmas}) != len(sigmas):
        raise InvalidArgumentError(f"--sigmas: {sigmas} repeats a value (to 6 significant digits)")
    per_cat: dict[str, Any] = {}
    for f in files:
        d = _load(f)
        maps = torch.from_numpy(np.asarray(d["maps"], dtype=np.float32))
        masks, labels = np.asarray(d["masks"], dtype=bool), np.asarray(d["labels"])
        res: dict[str, Any] = {}
        for s in sigmas:
            blurred = gaussian_blur(maps, s)
            m = blurred.numpy()
            entry: dict[str, Any] = {"pixel_auroc": pixel_auroc(m, masks), "aupro": aupro(m, masks, fpr_limit),
                                     "image_auroc": {}}
            for rule in rules:
                entry["image_auroc"][_rule_name(rule)] = image_auroc(
                    image_scores(blurred, rule[0], rule[1]).numpy(), labels)
            res[f"sigma={s:g}"] = entry
        per_cat[f.stem] = res
    cats = list(per_cat)
    mean: dict[str, Any] = {}
    for key in per_cat[cats[0]]:
        mean[key] = {
            "pixel_auroc": float(np.mean([per_cat[c][key]["pixel_auroc"] for c in cats])),
            "aupro": float(np.mean([per_cat[c][key]["aupro"] for c in cats])),
            "image_auroc": {r: float(np.mean([per_cat[c][key]["image_auroc"][r] for c in cats]))
                            for r in per_cat[cats[0]][key]["image_auroc"]},
        }
    return {"categories": cats, "sigmas": sigmas, "rules": [_rule_name(r) for r in rules],
            "per_category": per_cat, "mean": mean}


def choose_scoring(mean: dict[str, Any]) -> dict[str, Any]:
    """The (sigma, rule) with the highest mean of image AUROC and AUPRO (the scoring choice of
    docs/accuracy-protocol.md): ``{"sigma", "rule", "image_auroc", "aupro", "value"}``, fractions.

    Ties keep the first in the order of ``mean`` (sigmas as given, then rules as given), so the
    smaller blur and the earlier rule win a tie.

    Args:
        mean: the ``"mean"`` entry of :func:`rescore` or :func:`rescore_runs` (keys ``"sigma=S"``).

    Raises:
        InvalidArgumentError: an empty ``mean``, a key that is not ``sigma=S``, or a value that
            is not a finite number.
    """
    best: Optional[dict[str, Any]] = None
    for key, e in mean.items():
        name, _, sigma = key.partition("=")
        if name != "sigma" or not sigma:
            raise InvalidArgumentError(f"mean: expected keys 'sigma=S', got {key!r}")
        for rule, img in e["image_auroc"].items():
            value = (img + e["aupro"]) / 2
            if not np.isfinite(value):
                raise InvalidArgumentError(f"mean[{key!r}]: image AUROC ({rule}) or AUPRO is not a finite number")
            if best is None or value > best["value"]:
                best = {"sigma": float(sigma), "rule": rule, "image_auroc": img,
                        "aupro": e["aupro"], "value": value}
    if best is None:
        raise InvalidArgumentError("mean: expected at least one sigma and one rule, got none")
    return best


def mean_over_runs(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The unweighted mean over runs of each run's ``"mean"`` (of :func:`rescore` or
    :func:`rescore_runs`), in the same form; the runs must share sigmas and rules."""
    first = results[0]["mean"]
    return {key: {"pixel_auroc": float(np.mean([r["mean"][key]["pixel_auroc"] for r in results])),
                  "aupro": float(np.mean([r["mean"][key]["aupro"] for r in results])),
                  "image_auroc": {rule: float(np.mean([r["mean"][key]["image_auroc"][rule] for r in results]))
                                  for rule in e["image_auroc"]}}
            for key, e in first.items()}


def rescore_runs(maps_dirs: Sequence[str | os.PathLike], sigmas: Sequence[float],
                 rules: Sequence[tuple[str, float]], categories: Optional[Sequence[str]] = None,
                 fpr_limit: float = 0.3) -> dict[str, Any]:
    """:func:`rescore` of several runs (seeds, cells) and the mean over them, with the choice.

    Args:
        maps_dirs: one or more folders of saved maps (see :func:`rescore`; one path alone is one run), e.g.
            ``OUT/cells/*/seed*/maps`` of ``dcamkd ablate --save-maps``.
        sigmas, rules, categories, fpr_limit: as in :func:`rescore`.

    Returns:
        ``{"runs": [folder, ...], "categories", "sigmas", "rules", "per_run": {folder: rescore()},
        "mean": {"sigma=S": {"pixel_auroc", "aupro", "image_auroc": {rule: value}}},
        "choice": choose_scoring(mean)}``; ``mean`` is the unweighted mean over runs of each
        run's mean over categories. Values are fractions in [0, 1].

    Raises:
        InvalidArgumentError: no folder, a folder given twice, or runs whose categories differ.
        Otherwise as :func:`rescore`.
    """
    if isinstance(maps_dirs, (str, os.PathLike)):
        maps_dirs = [maps_dirs]
    dirs = [str(d) for d in maps_dirs]
    if not dirs:
        raise InvalidArgumentError("--maps: expected at least one folder")
    resolved = [Path(d).resolve() for d in dirs]
    if len(set(resolved)) != len(resolved):
        raise InvalidArgumentError(f"--maps: a folder is given twice (after resolving the paths): {dirs}")
    per_run = {d: rescore(d, sigmas, rules, categories, fpr_limit) for d in dirs}
    cats = per_run[dirs[0]]["categories"]
    for d in dirs[1:]:
        if per_run[d]["categories"] != cats:
            raise InvalidArgumentError(f"--maps {d}: categories {per_run[d]['categories']} differ from "
                                       f"{cats} of {dirs[0]}; compare runs on the same categories")
    first = per_run[dirs[0]]
    mean = mean_over_runs([per_run[d] for d in dirs])
    return {"runs": dirs, "categories": cats, "sigmas": first["sigmas"], "rules": first["rules"],
            "per_run": per_run, "mean": mean, "choice": choose_scoring(mean)}


def rescore_table_md(res: dict[str, Any]) -> str:
    """A Markdown table of the means of :func:`rescore` or :func:`rescore_runs`: one row per sigma,
    percent; with :func:`rescore_runs`, the number of runs and the choice under it."""
    head = ["sigma", "pixel AUROC", "AUPRO"] + [f"image AUROC {r}" for r in res["rules"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["sigmas"]:
        e = res["mean"][f"sigma={s:g}"]
        lines.append("| " + " | ".join([f"{s:g}", f"{100 * e['pixel_auroc']:.2f}", f"{100 * e['aupro']:.2f}"]
                                       + [f"{100 * e['image_auroc'][r]:.2f}" for r in res["rules"]]) + " |")
    runs = f" and {len(res['runs'])} runs" if len(res.get("runs", ())) > 1 else ""
    text = (f"Mean over {len(res['categories'])} categories ({', '.join(res['categories'])}){runs}; percent.\n\n"
            + "\n".join(lines) + "\n")
    if "choice" in res:
        c = res["choice"]
        text += (f"\nHighest mean of image AUROC and AUPRO: sigma {c['sigma']:g}, {c['rule']} "
                 f"(image AUROC {100 * c['image_auroc']:.2f}, AUPRO {100 * c['aupro']:.2f}).\n")
    return text
