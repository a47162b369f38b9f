"""Non-private end-to-end fine-tuning of the public network on labelled faces: the honest reference.

This is not a deployment recipe: it reads the device's training images and labels in clear. It
answers how good a model can be on the same data without privacy, so that a private figure is a
share of an honest best (issue 23: a careful fine-tune from outside reached 0.80 held-out where
the demo's own non-private run said 0.56, and a private 0.44 was 55% of it, not 92%).

The recipe is the transfer-learning one that works on small labelled sets: the whole network from
the public weights, a fresh classifier, SGD with momentum 0.9 and weight decay 5e-4, mirrored and
shifted images, the learning rate along a half cosine. Its learning rate and length are chosen on a
PUBLIC task of the same shape (``dpa.runs.reference``), never on the private test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpa.contract.architecture import ArchConfig
from dpa.contract.errors import UserError
from exporter.augment import flip_and_shift
from exporter.pretrain import PRETRAIN_THREADS
from exporter.vggface import build_parts, load_weights

__all__ = ["FineTuneConfig", "fine_tune", "predict"]


@dataclass(frozen=True)
class FineTuneConfig:
    lr: float = 3e-3  # SGD's peak learning rate (the cosine falls from it to 0)
    epochs: int = 12
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # flips and 4-pixel shifts (``exporter.augment``)
    seed: int = 0  # the fresh classifier, the shuffling and the augmentation
    #: torch threads, fixed for the same reason as pretraining's: the thread count changes float32 rounding.
    threads: int = PRETRAIN_THREADS

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"fine-tune {name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"fine-tune learning rate must be > 0, got {self.lr}")
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise UserError(f"fine-tune needs 0 <= momentum < 1 and weight decay >= 0, got {self}")


def fine_tune(
    weights: Path, arch: ArchConfig, images: np.ndarray, labels: np.ndarray, cfg: FineTuneConfig
) -> torch.nn.Sequential:
    """The whole network (conv1_1..fc8, ``arch.num_classes`` outputs) trained on (images, labels):
    preprocessed (N, 3, H, W) float32 images as the device loads them, labels in 0..num_classes-1."""
    if len(images) != len(labels) or len(images) == 0:
        raise UserError(f"fine-tune needs as many labels as images (> 0), got {len(images)} and {len(labels)}")
    if labels.min() < 0 or labels.max() >= arch.num_classes:
        raise UserError(f"fine-tune labels must lie in 0..{arch.num_classes - 1}")
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        head, tail = build_parts(arch, "fc7")
        load_weights((head, tail), weights, seed=cfg.seed)  # fc8 for these identities starts fresh
        model = torch.nn.Sequential(head, tail).to(memory_format=torch.channels_last)
        _train(model, images, labels, cfg)
        return model.eval()
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _train(model: torch.nn.Sequential, images: np.ndarray, labels: np.ndarray, cfg: FineTuneConfig) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(order), cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            rows = torch.from_numpy(order[start : start + cfg.batch_size])
            batch = flip_and_shift(x[rows], rng) if cfg.augment else x[rows]
            loss = torch.nn.functional.cross_entropy(model(batch), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def predict(model: torch.nn.Sequential, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The fine-tuned network's identity for each preprocessed image."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()
