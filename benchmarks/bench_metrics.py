"""Time and memory of the exact metric accumulator (dcamkd.metrics.MetricAccumulator) on a
test set of a given size, e.g. an industrial3 category (magnetic_tile: 488 test images) at the
evaluation size 256 x 256.

    python benchmarks/bench_metrics.py --images 200 --size 256 [--shards 2] [--json out.json]

Synthetic maps: a smooth background plus brighter defect blobs on two thirds of the images
(as ``tests/test_metrics.py``'s realistic case), float32. Reported: the bytes the accumulator
holds, the seconds of ``update`` (batches of 16), of ``merge`` of the shards' state dicts and of
each metric in ``compute``, and the peak of numpy memory traced during ``compute`` above what the
accumulator holds (``tracemalloc``: numpy reports its allocations to it).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from dcamkd import metrics as M


def synthetic(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    labels = np.zeros(n, np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        base = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), 2)
        m = 0.45 * (base - base.min()) / (base.max() - base.min() + 1e-12) + 0.1
        if i % 3:
            labels[i] = 1
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(8, size - 8, size=2)
                r = rng.integers(2, max(3, size // 8))
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                masks[i] |= blob
                m = m + blob * rng.uniform(0.0, 0.5)
        maps[i] = m + 0.05 * rng.standard_normal((size, size)).astype(np.float32) ** 2
    return maps, masks, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shards", type=int, default=1, help="score in this many shards, then merge")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()
    maps, masks, labels = synthetic(a.images, a.size)
    out: dict = {"images": a.images, "size": a.size, "shards": a.shards}
    t0 = time.perf_counter()
    shards = []
    for k in range(a.shards):
        acc = M.MetricAccumulator()
        lo, hi = k * a.images // a.shards, (k + 1) * a.images // a.shards
        for i in range(lo, hi, 16):
            j = min(i + 16, hi)
            acc.update(maps[i:j], masks[i:j], labels[i:j])
        shards.append(acc)
    out["update_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = M.MetricAccumulator()
    for sh in shards:
        acc.merge(M.MetricAccumulator.from_state_dict(sh.state_dict()))
    acc.arrays()
    out["merge_s"] = time.perf_counter() - t0
    del shards
    held = sum(x.nbytes for x in acc.arrays())
    out["held_MiB"] = held / 2**20
    out["held_KiB_per_image"] = held / 1024 / a.images
    tracemalloc.start()
    t0 = time.perf_counter()
    res = acc.compute()
    out["compute_s"] = time.perf_counter() - t0
    out["compute_peak_extra_MiB"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    mm, gg, yy, ss = acc.arrays()
    for name, fn in (("pixel_auroc", lambda: M.pixel_auroc(mm, gg)), ("aupro", lambda: M.aupro(mm, gg)),
                     ("pro_dfr", lambda: M.pro_dfr(mm, gg)), ("pixel_f1max", lambda: M.f1_max(mm, gg))):
        t0 = time.perf_counter()
        fn()
        out[f"{name}_s"] = time.perf_counter() - t0
    out["metrics"] = {k: res[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pro_dfr", "pixel_f1max")}
    for k, v in out.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
