"""Check that the exported artifacts are the PyTorch network, forward and backward.

Runs the head and tail artifacts with onnxruntime's training API on a random batch
and compares against torch autograd on the same weights: activations, logits, loss,
d loss / d activation and every parameter gradient of both halves. With dropout > 0
the tail's training graph is random, so its backward is checked on a dropout-free
twin exported from the same weights (the dropout node itself is onnxruntime's); the
eval graphs and the head are always checked on the published files.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpa.contract.manifest import ARTIFACT_FILES, GraphNames
from dpa.contract.ort_training import CheckpointState, Module

__all__ = ["VerifyReport", "verify_export"]


@dataclass
class VerifyReport:
    """Per compared tensor: max absolute error and relative L2 error ||ours - torch|| / ||torch||.

    The relative error is a norm, not an element-wise maximum, on purpose: max-pooling
    routes each gradient to its window's maximum, and where two values tie within float32
    rounding ORT and torch may route a few of millions of elements differently. That moves
    a handful of elements by their full size (visible in the max absolute error) while the
    tensor as a whole agrees to ~1e-7; a wrong graph is off by orders of magnitude more.
    """

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ours: np.ndarray, reference: np.ndarray) -> None:
        if ours.shape != reference.shape:
            raise ValueError(f"verification: {name} has shape {ours.shape}, torch gives {reference.shape}")
        diff = ours.astype(np.float64) - reference
        abs_err = float(np.max(np.abs(diff))) if diff.size else 0.0
        norm = float(np.linalg.norm(reference.astype(np.float64)))
        self.errors[name] = (abs_err, float(np.linalg.norm(diff)) / max(norm, 1e-30))

    @property
    def max_abs_error(self) -> float:
        return max(a for a, _ in self.errors.values())

    @property
    def max_rel_error(self) -> float:
        return max(r for _, r in self.errors.values())

    @property
    def worst(self) -> str:
        return max(self.errors, key=lambda k: self.errors[k][1])


def _load(part_dir: Path) -> tuple[CheckpointState, Module]:
    state = CheckpointState.load_checkpoint(str(part_dir / ARTIFACT_FILES.checkpoint))
    module = Module(str(part_dir / ARTIFACT_FILES.training), state, str(part_dir / ARTIFACT_FILES.eval), device="cpu")
    return state, module


def verify_export(directory: Path, head: nn.Module, tail: nn.Module, *, batch: int, seed: int) -> VerifyReport:
    from dpa.contract.manifest import load_manifest

    manifest = load_manifest(directory, verify=("head", "tail"))
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, *manifest.input_shape, generator=gen)
    labels = torch.randint(0, manifest.num_classes, (batch,), generator=gen)
    report = VerifyReport()

    head_state, head_module = _load(directory / "head")
    tail_state, tail_module = _load(directory / "tail")

    # Forward: head activations and tail logits (eval graphs, no dropout).
    head.zero_grad()
    act = head.eval()(images)
    head_module.eval()
    act_ort = head_module(images.numpy())
    report.add("head.activation", act_ort, act.detach().numpy())
    tail_eval = copy.deepcopy(tail).eval()
    with torch.no_grad():
        logits = tail_eval(act)
    tail_module.eval()
    report.add("tail.logits", tail_module(act.detach().numpy()), logits.numpy())

    # Backward of the tail: loss, d loss / d activation, parameter gradients.
    if manifest.dropout > 0:
        twin = copy.deepcopy(tail)
        twin.dropout.p = 0.0  # type: ignore[union-attr]  # only VGG-Face has dropout (manifest.dropout > 0)
        report.notes.append("dropout > 0: tail backward checked on a dropout-free twin of the same weights")
        with tempfile.TemporaryDirectory() as tmp:
            from exporter.ort_artifacts import export_onnx, write_part_artifacts

            write_part_artifacts(
                export_onnx(twin.train(), act.detach(), GraphNames.ACTIVATION, GraphNames.LOGITS),
                part="tail",
                out_dir=Path(tmp),
                optimizer=manifest.optimizer,
            )
            _check_tail(report, *_load(Path(tmp)), twin, act, labels)
    else:
        _check_tail(report, tail_state, tail_module, copy.deepcopy(tail), act, labels)

    # Backward of the head: the VJP with the tail's d loss / d activation.
    upstream = _upstream(tail, act, labels)
    act.backward(upstream)
    head_module.train()
    head_module.lazy_reset_grad()
    head_module(images.numpy(), upstream.numpy())
    for name, param in head.named_parameters():
        if param.requires_grad:  # a frozen release projection is a constant of the graphs, not trained
            report.add(f"head.{name}.grad", head_state.parameters[name].grad, param.grad.numpy())
    return report


def _upstream(tail: nn.Module, act: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d loss / d activation from a dropout-free copy of the tail (the head's upstream gradient)."""
    twin = copy.deepcopy(tail).train()
    for module in twin.modules():  # VGG-Face's tail has dropout; other families have none
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    a = act.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(twin(a), labels).backward()
    assert a.grad is not None
    return a.grad


def _check_tail(
    report: VerifyReport,
    state: CheckpointState,
    module: Module,
    tail: nn.Module,
    act: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    tail.train().zero_grad()
    a = act.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(tail(a), labels)
    loss.backward()
    module.train()
    module.lazy_reset_grad()
    loss_ort, _logits, act_grad = module(a.detach().numpy(), labels.numpy())
    report.add("tail.loss", np.asarray(loss_ort).reshape(()), loss.detach().numpy().reshape(()))
    assert a.grad is not None
    report.add("tail.d_loss/d_activation", act_grad, a.grad.numpy())
    for name, param in tail.named_parameters():
        assert param.grad is not None
        report.add(f"tail.{name}.grad", state.parameters[name].grad, param.grad.numpy())
