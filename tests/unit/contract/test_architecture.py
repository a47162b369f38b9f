"""The torch-free layer table agrees with the torch network it describes."""

from __future__ import annotations

import pytest
import torch

from dpa.contract.architecture import ArchConfig, cut_info, cut_names, layers, validate_cut
from exporter.vggface import build_parts


def test_published_vggface_has_the_published_size():
    cfg = ArchConfig()
    total = sum(layer.params for layer in layers(cfg))
    assert total == 145_002_878  # VGG-16 with a 2622-way fc8 (VGG-Face)
    assert cut_info(cfg, "conv1_1").bytes_per_example == 64 * 224 * 224 * 4  # 12.8 MB, as measured in the brief


@pytest.mark.parametrize("cut", ["conv1_1", "pool1", "conv3_2", "pool5", "fc6", "fc7"])
def test_table_matches_torch(cut):
    cfg = ArchConfig(image_size=64, width=0.25, num_classes=5)
    head, tail = build_parts(cfg, cut)
    info = cut_info(cfg, cut)
    with torch.no_grad():
        act = head(torch.zeros(2, 3, 64, 64))
        logits = tail(act)
    assert tuple(act.shape[1:]) == info.activation_shape
    assert tuple(logits.shape) == (2, 5)
    n_head = sum(p.numel() for p in head.parameters())
    n_all = n_head + sum(p.numel() for p in tail.parameters())
    assert n_all == sum(layer.params for layer in layers(cfg))
    assert info.head_params_share == pytest.approx(n_head / n_all)


def test_cut_names_and_errors():
    assert cut_names()[0] == "conv1_1" and cut_names()[-1] == "fc7" and len(cut_names()) == 20
    with pytest.raises(ValueError, match="unknown cut 'fc8'; valid cuts: conv1_1"):
        validate_cut("fc8")
    with pytest.raises(ValueError, match="width must be in"):
        ArchConfig(width=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        ArchConfig(dropout=1.0)
