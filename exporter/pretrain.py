"""``dpa pretrain``: train VGG-Face on PUBLIC faces, for ``dpa export --weights``.

Differential privacy pays for what a model learns from private data; features learned from public
data are free. So the whole network is trained here, without any noise, on faces whose identities
are disjoint from every device's: on the built-in data, the synthetic generator's identities of
another seed (``PUBLIC_SEED``; devices draw theirs from seed 0), on real data a folder of public
identities. Nothing private is read. The weights are written as a layer-named state dict
(``conv1_1.weight``, ..., ``fc8.*`` for the public identities: ``dpa export`` re-initialises an fc8
of another class count), with a JSON sidecar saying what they were trained on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.contract.architecture import ArchConfig
from dpa.contract.atomic import atomic_write_bytes, atomic_write_with
from dpa.contract.errors import UserError
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from exporter.export import VGGFACE_MEAN
from exporter.vggface import build_parts, init_weights

__all__ = ["PUBLIC_SEED", "PretrainConfig", "native_bf16", "pretrain", "public_faces"]

#: The built-in generator's seed for public faces; devices' built-in faces use seed 0.
PUBLIC_SEED = 1
#: Pixel scale the pretrained network is trained with (as an export from scratch); ``--pixel-std``.
PRETRAIN_PIXEL_STD = 64.0
#: The torch thread count pretraining runs with: this machine kind's 2 cores.
PRETRAIN_THREADS = 2


@dataclass(frozen=True)
class PretrainConfig:
    out: Path = Path("runs/pretrained/weights.pt")
    data: str = "synthetic"  # or an LFW-layout folder of PUBLIC identities
    identities: int = 40  # synthetic public identities
    per_identity: int = 40
    image_size: int = 64
    width: float = 0.25
    epochs: int = 10
    batch_size: int = 32
    # AdamW. 1e-3 sat on the take-off edge of this plain VGG (no batch norm): at 40 x 40 public faces seeds 1
    # and 2 never left chance (train accuracy 0.02 after 10 epochs; seed 0 0.37), so the demo's figures
    # swung with the seed and the CPU's rounding (issue 22). At 3e-4 seeds 0-2 reached 0.63-0.74.
    lr: float = 3e-4
    seed: int = 0  # initialisation and shuffling
    cache_dir: Path | None = None  # synthetic faces; default next to ``out``
    #: torch threads. Fixed, not "all cores": oneDNN splits a convolution's weight-gradient reduction
    #: by thread, so the thread count changes the float32 rounding and, over ten epochs, the weights.
    threads: int = PRETRAIN_THREADS
    #: bfloat16 autocast (weights and updates stay float32). Off by default: it is only native on some
    #: CPUs (AVX512-BF16/AMX, where a step ran 2.2x faster), so with it on the weights, and every figure
    #: after them, would depend on which CPU the newcomer has (issue 22). The sidecar records it.
    mixed_precision: bool = False

    def __post_init__(self) -> None:
        for name in ("identities", "per_identity", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"pretrain {name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"pretrain learning rate must be > 0, got {self.lr}")
        if self.threads < 1:
            raise UserError(f"pretrain threads must be >= 1, got {self.threads}")
        if self.mixed_precision and not native_bf16():
            raise UserError("--mixed-precision needs a CPU that computes bfloat16 natively (AVX512-BF16 or AMX)")


def public_faces(root: Path, identities: int, per_identity: int, size: int) -> Path:
    """The built-in PUBLIC faces (seed ``PUBLIC_SEED``), generated once under ``root``."""
    return cached_faces(
        root, SynthConfig(identities=identities, per_identity=per_identity, size=size, seed=PUBLIC_SEED)
    )


def pretrain(cfg: PretrainConfig, *, progress: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Train the whole network on the public faces; write the weights and their sidecar JSON."""
    started = time.perf_counter()
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        if cfg.data == "synthetic":
            root = public_faces(cfg.cache_dir or cfg.out.parent / "faces", cfg.identities, cfg.per_identity,
                                cfg.image_size)  # fmt: skip
        else:
            root = Path(cfg.data)
        index = index_faces(root, min_faces_per_person=2)
        images = load_batch(list(index.paths), size=cfg.image_size, mean=VGGFACE_MEAN, std=(PRETRAIN_PIXEL_STD,) * 3)
        labels = index.labels.astype(np.int64)
        arch = ArchConfig(image_size=cfg.image_size, width=cfg.width, num_classes=len(index.names), dropout=0.0)
        head, tail = build_parts(arch, "fc7")
        init_weights((head, tail), cfg.seed)
        # Channels-last: oneDNN's convolutions run 1.3x faster on it than on NCHW at these sizes.
        net = torch.nn.Sequential(head, tail).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
        x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels)
        bf16 = cfg.mixed_precision
        rng = np.random.default_rng(cfg.seed)
        history = []
        for epoch in range(cfg.epochs):
            net.train()
            order = rng.permutation(len(x))
            loss_sum, correct = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = net(x[rows])
                    loss = torch.nn.functional.cross_entropy(logits.float(), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(rows)
                correct += int((logits.argmax(1) == y[rows]).sum())
            history.append({"epoch": epoch + 1, "loss": loss_sum / len(x), "train_accuracy": correct / len(x)})
            if progress is not None:
                progress(epoch + 1, history[-1]["loss"], history[-1]["train_accuracy"])
        state = {k: v.detach().contiguous().clone() for part in (head, tail) for k, v in part.state_dict().items()}
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(cfg.out, lambda tmp: torch.save(state, tmp))
        info = {
            "what": "VGG-Face trained on public faces only (dpa pretrain)",
            "identities": list(index.names),
            "images": len(index.paths),
            "data": str(root),
            "public_seed": PUBLIC_SEED if cfg.data == "synthetic" else None,
            "pixel_mean": list(VGGFACE_MEAN),
            "pixel_std": PRETRAIN_PIXEL_STD,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "history": history,
            "seconds": round(time.perf_counter() - started, 1),
            "bfloat16": bf16,
            "precision": "bfloat16 autocast" if bf16 else "float32",
            "threads": cfg.threads,
        }
        atomic_write_bytes(sidecar(cfg.out), (json.dumps(info, indent=1) + "\n").encode())
        return info
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (elsewhere autocast would be slower, not faster)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def sidecar(weights: Path) -> Path:
    return Path(str(weights) + ".json")
