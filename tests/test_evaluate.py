"""Scoring test sets (dcamkd.evaluate): exact metrics for maps of any scale."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dcamkd import metrics as M
from dcamkd.data import build_datasets
from dcamkd.evaluate import evaluate_category

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class _Maps(torch.nn.Module):
    """A stand-in inference model: ``(B, 3, S, S)`` -> maps ``(B, S, S)`` (squared distance of each
    pixel to the image's mean colour, times ``scale``, cubed for ``product``) and their maxima."""

    def __init__(self, fusion: str, scale: float):
        super().__init__()
        self.fusion, self.scale = fusion, scale

    def forward(self, x):
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).mean(dim=1) * 0.05
        maps = d.pow(3) if self.fusion == "product" else d
        maps = maps * self.scale
        return maps, maps.flatten(1).amax(dim=1)


def _exact(model, ds):
    xs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    maps, scores = model(xs)
    masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    labels = np.asarray(ds.labels)
    maps = maps.numpy()
    return {"image_auroc": M.image_auroc(scores.numpy(), labels), "pixel_auroc": M.pixel_auroc(maps, masks),
            "aupro": M.aupro(maps, masks), "pro_dfr": M.pro_dfr(maps, masks),
            "image_f1max": M.f1_max(scores.numpy(), labels), "pixel_f1max": M.f1_max(maps, masks)}


@pytest.mark.parametrize("fusion, scale", [("product", 1.0), ("product", 1e-4), ("sum", 1.0), ("sum", 50.0)])
def test_evaluate_category_is_exact_for_maps_of_any_scale(make_tree, fusion, scale):
    root = make_tree(categories=("alpha",), n_train=2, n_test_good=3, n_defect=4, size=48)
    _, _, tests, _ = build_datasets(root, None, 48, MEAN, STD, 0.5, 0)
    ds = tests["alpha"]
    model = _Maps(fusion, scale).eval()
    exact = _exact(model, ds)
    if fusion == "product" and scale == 1e-4:  # a small product map: a fixed histogram range collapsed it
        assert float(model(torch.stack([ds[0]["image"]]))[0].max()) < 1e-5
    res = evaluate_category(model, ds, batch_size=3)
    assert res["undefined"] == {} and res["num_images"] == len(ds) == 7
    for key, value in exact.items():
        assert abs(res[key] - value) <= 1e-9, (key, res[key], value)
    assert (res["n_good"], res["n_defective"]) == (3, 4)
