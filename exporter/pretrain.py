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

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import Choice
from dpa.contract.errors import UserError
from dpa.faces.lfw import FaceIndex, index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.faces.verification import cosine_scores, sample_pairs, verification
from exporter.augment import flip_and_shift
from exporter.export import VGGFACE_MEAN
from exporter.margin_loss import cosface_logits, margin_at
from exporter.vggface import build_parts, init_weights, load_weights

__all__ = [
    "PUBLIC_SEED",
    "VALIDATION_SEED",
    "PretrainConfig",
    "PretrainLoss",
    "embed",
    "native_bf16",
    "pretrain",
    "public_faces",
]

#: The built-in generator's seed for public faces; devices' built-in faces use seed 0.
PUBLIC_SEED = 1
#: The seed of the held-out public identities pretraining validates on (neither public training nor device).
VALIDATION_SEED = 2
#: Pixel scale the pretrained network is trained with (as an export from scratch); ``--pixel-std``.
PRETRAIN_PIXEL_STD = 64.0
#: The torch thread count pretraining runs with: this machine kind's 2 cores.
PRETRAIN_THREADS = 2


class PretrainLoss(Choice):
    """What the public network is trained on (``exporter.margin_loss``)."""

    SOFTMAX = "softmax"  # cross-entropy over the public identities (fc8)
    COSFACE = "cosface"  # a cosine margin on the normalised fc7 embedding (CosFace, CVPR 2018)


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
    seed: int = 0  # initialisation, shuffling and augmentation
    cache_dir: Path | None = None  # synthetic faces; default next to ``out``
    #: torch threads. Fixed, not "all cores": oneDNN splits a convolution's weight-gradient reduction
    #: by thread, so the thread count changes the float32 rounding and, over ten epochs, the weights.
    threads: int = PRETRAIN_THREADS
    #: bfloat16 autocast (weights and updates stay float32). Off by default: it is only native on some
    #: CPUs (AVX512-BF16/AMX, where a step ran 2.2x faster), so with it on the weights, and every figure
    #: after them, would depend on which CPU the newcomer has (issue 22). The sidecar records it.
    mixed_precision: bool = False
    loss: PretrainLoss = PretrainLoss.SOFTMAX
    margin: float = 0.35  # CosFace's m (the paper's 0.35)
    scale: float = 30.0  # CosFace's s: logits of a 1024-d cosine need a scale to reach a confident softmax
    margin_ramp_epochs: float = 2.0  # the margin grows from 0 over these first epochs (take-off first)
    augment: bool = False  # mirror and shift each training image (``exporter.augment``)
    cosine_schedule: bool = False  # the learning rate falls from ``lr`` to 0 along a half cosine
    warmup_epochs: float = 0.0  # the learning rate rises linearly from 0 to ``lr`` over these first epochs
    #: Held-out PUBLIC identities (seed ``VALIDATION_SEED``, synthetic data only) whose pairs measure
    #: verification after each epoch; 0: none. Never the device's identities.
    val_identities: int = 0
    val_per_identity: int = 8
    keep_classifier: bool = True  # False: the weights file leaves out fc8 (a public classifier no device uses)
    #: Start from these weights (an earlier ``dpa pretrain``'s, e.g. on fewer identities) instead of a fresh
    #: initialisation; an fc8 of another class count or none is initialised from ``seed``. A plain VGG without
    #: batch norm does not take off from scratch on 2000 identities (it sat at ln 2000 for 20 epochs); from
    #: features that already separate 800 it need not. The sidecar records the file's hash and command.
    init: Path | None = None

    def __post_init__(self) -> None:
        for name in ("identities", "per_identity", "epochs", "batch_size", "val_per_identity"):
            if getattr(self, name) < 1:
                raise UserError(f"pretrain {name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.val_identities < 0 or self.val_identities == 1:
            raise UserError(f"pretrain validation identities must be 0 or >= 2, got {self.val_identities}")
        if not self.lr > 0:
            raise UserError(f"pretrain learning rate must be > 0, got {self.lr}")
        if self.threads < 1:
            raise UserError(f"pretrain threads must be >= 1, got {self.threads}")
        if self.mixed_precision and not native_bf16():
            raise UserError("--mixed-precision needs a CPU that computes bfloat16 natively (AVX512-BF16 or AMX)")
        object.__setattr__(self, "loss", PretrainLoss.parse(self.loss))
        if self.init is not None and not Path(self.init).is_file():
            raise UserError(f"pretrain --init: no weights file at {self.init}")
        if not (0 <= self.margin < 1 and self.scale > 0):
            raise UserError(f"CosFace needs 0 <= margin < 1 and scale > 0, got {self.margin}, {self.scale}")


def reproduce_command(cfg: PretrainConfig) -> str:
    """The ``dpa pretrain`` command line that trains exactly ``cfg`` (every option spelled out), for the
    sidecar: shipped weights name the command that reproduces them."""
    flags = {"augment": "--augment", "cosine_schedule": "--cosine-schedule", "mixed_precision": "--mixed-precision"}
    parts = ["dpa pretrain"]
    for key, value in asdict(cfg).items():
        if key == "cache_dir" or (key == "init" and value is None):
            continue
        if key == "keep_classifier":
            parts += [] if value else ["--no-classifier"]
        elif key in flags:
            parts += [flags[key]] if value else []
        else:
            shown = value.value if isinstance(value, Enum) else value
            parts.append(f"--{key.replace('_', '-')} {shown}")
    return " ".join(parts)


def public_faces(root: Path, identities: int, per_identity: int, size: int, seed: int = PUBLIC_SEED) -> Path:
    """The built-in PUBLIC faces (seed ``PUBLIC_SEED``; validation: ``VALIDATION_SEED``), generated once under
    ``root``."""
    return cached_faces(root, SynthConfig(identities=identities, per_identity=per_identity, size=size, seed=seed))


def _load(root: Path, cfg: PretrainConfig) -> tuple[FaceIndex, np.ndarray]:
    index = index_faces(root, min_faces_per_person=2)
    return index, load_batch(list(index.paths), size=cfg.image_size, mean=VGGFACE_MEAN, std=(PRETRAIN_PIXEL_STD,) * 3)


def embed(head: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The head's fc7 output (the embedding a device at cut fc7 releases), in eval mode."""
    head.eval()
    with torch.no_grad():
        return torch.cat([head(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def _validate(head: torch.nn.Module, val: tuple[torch.Tensor, np.ndarray] | None) -> dict[str, float]:
    """Verification on held-out public pairs (``dpa.faces.verification``); {} without validation faces."""
    if val is None:
        return {}
    x, labels = val
    pairs = sample_pairs(labels, np.random.default_rng(0), genuine=3000, impostor=10000)
    scores = cosine_scores(embed(head, x), pairs)
    return {f"val_{k}": v for k, v in verification(scores, pairs.same).items() if not k.endswith("_pairs")}


class _Objective(torch.nn.Module):
    """The loss on top of head (conv1_1..fc7): fc8's softmax, or CosFace on fc7 with fc8's rows as directions."""

    def __init__(self, tail: torch.nn.Module, cfg: PretrainConfig) -> None:
        super().__init__()
        self.tail, self.cfg = tail, cfg

    def forward(self, emb: torch.Tensor, y: torch.Tensor, epoch: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(loss, logits to score accuracy by, the loss of guessing). CosFace's accuracy is scored without
        its margin (the nearest identity direction): with it, a run that learns well still scored 0.000
        for its first epochs on 1600 identities. Guessing (every cosine 0) there costs s m + ln(e^-sm + K - 1),
        not ln K."""
        if self.cfg.loss is PretrainLoss.SOFTMAX:
            logits = self.tail(emb)
            return torch.nn.functional.cross_entropy(logits.float(), y), logits, math.log(logits.shape[1])
        m = margin_at(epoch, margin=self.cfg.margin, ramp_epochs=self.cfg.margin_ramp_epochs)
        logits = cosface_logits(emb, self.tail.fc8.weight, y, scale=self.cfg.scale, margin=m)
        plain = logits.detach() + self.cfg.scale * m * torch.nn.functional.one_hot(y, logits.shape[1])
        sm = self.cfg.scale * m
        guess = sm + math.log(math.exp(-sm) + logits.shape[1] - 1)
        return torch.nn.functional.cross_entropy(logits.float(), y), plain, guess


def at_chance(loss: float, accuracy: float, classes: int, guess_loss: float | None = None) -> bool:
    """Whether an epoch's training figures are still those of guessing: the cross-entropy within 2% of
    ln(classes) (a network that guesses uniformly scores exactly that) and the accuracy at most twice
    chance. A plain VGG without batch norm can sit there for good (issue 22: AdamW 1e-3 on 40
    identities; on 2000 public identities at 3e-4 with a cosine schedule it never left ln(2000) in 20
    epochs), and a run that does should say so after its first epochs, not after an hour."""
    guess = math.log(classes) if guess_loss is None else guess_loss  # CosFace's differs (_Objective)
    return loss >= 0.98 * guess and accuracy <= 2.0 / classes


def pretrain(cfg: PretrainConfig, *, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the whole network on the public faces; write the weights and their sidecar JSON."""
    started = time.perf_counter()
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        cache = cfg.cache_dir or cfg.out.parent / "faces"
        synthetic = cfg.data == "synthetic"
        root = public_faces(cache, cfg.identities, cfg.per_identity, cfg.image_size) if synthetic else Path(cfg.data)
        index, images = _load(root, cfg)
        val = None
        if cfg.val_identities and synthetic:
            vroot = public_faces(cache, cfg.val_identities, cfg.val_per_identity, cfg.image_size, VALIDATION_SEED)
            vindex, vimages = _load(vroot, cfg)
            val = (torch.from_numpy(vimages).contiguous(memory_format=torch.channels_last), vindex.labels)
        arch = ArchConfig(image_size=cfg.image_size, width=cfg.width, num_classes=len(index.names), dropout=0.0)
        head, tail = build_parts(arch, "fc7")
        init_weights((head, tail), cfg.seed)
        if cfg.init is not None:
            load_weights((head, tail), cfg.init, cfg.seed)
        history = _train(cfg, head, tail, images, index.labels.astype(np.int64), val, progress)
        state = {k: v.detach().contiguous().clone() for part in (head, tail) for k, v in part.state_dict().items()}
        if not cfg.keep_classifier:
            state = {k: v for k, v in state.items() if not k.startswith("fc8.")}
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.out, _state_bytes(state))
        info = {
            "what": "VGG-Face trained on public faces only (dpa pretrain)",
            "command": reproduce_command(cfg),
            "identities": list(index.names),
            "images": len(index.paths),
            "data": str(root),
            "public_seed": PUBLIC_SEED if synthetic else None,
            "validation": None
            if val is None
            else {
                "seed": VALIDATION_SEED,
                "identities": cfg.val_identities,
                "per_identity": cfg.val_per_identity,
            },  # fmt: skip
            "pixel_mean": list(VGGFACE_MEAN),
            "pixel_std": PRETRAIN_PIXEL_STD,
            "config": {
                k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
                for k, v in asdict(cfg).items()
            },  # fmt: skip
            "init": None if cfg.init is None else _init_facts(Path(cfg.init)),
            "history": history,
            "seconds": round(time.perf_counter() - started, 1),
            "bfloat16": cfg.mixed_precision,
            "precision": "bfloat16 autocast" if cfg.mixed_precision else "float32",
            "threads": cfg.threads,
            "sha256": hashlib.sha256(cfg.out.read_bytes()).hexdigest(),
        }
        atomic_write_bytes(sidecar(cfg.out), (json.dumps(info, indent=1) + "\n").encode())
        return info
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The state dict as ``torch.save`` writes it, to a buffer: saved to a file, the archive's folder is
    named after the file, and through the atomic write's random temp name two runs with identical tensors
    gave files with different SHA-256s (the shipped sidecar's hash would then never reproduce)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _init_facts(path: Path) -> dict[str, Any]:
    """What a run started from: the file, its SHA-256 and, from its own sidecar, the command that made it
    (so the chain that reproduces these weights is on record: that command, then this one)."""
    facts: dict[str, Any] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    side = sidecar(path)
    if side.is_file():
        earlier = json.loads(side.read_text())
        facts.update(command=earlier.get("command"), seconds=earlier.get("seconds"),
                     last_epoch=(earlier.get("history") or [None])[-1])  # fmt: skip
    return facts


def _lr_at(cfg: PretrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warmup over ``warmup_epochs``, then constant or a half cosine to 0 (insightface's schedule)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if not cfg.cosine_schedule:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def _train(
    cfg: PretrainConfig, head: torch.nn.Module, tail: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
    val: tuple[torch.Tensor, np.ndarray] | None, progress: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:  # fmt: skip
    # Channels-last: oneDNN's convolutions run 1.3x faster on it than on NCHW at these sizes.
    head.to(memory_format=torch.channels_last)
    objective = _Objective(tail, cfg)
    params = list(head.parameters()) + list(tail.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels)
    rng = np.random.default_rng(cfg.seed)
    classes = int(labels.max()) + 1
    history, step = [], 0
    for epoch in range(cfg.epochs):
        head.train()
        tail.train()
        order = rng.permutation(len(x))
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step, total, steps_per_epoch)
            rows = torch.from_numpy(order[start : start + cfg.batch_size])
            batch = flip_and_shift(x[rows], rng) if cfg.augment else x[rows]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision):
                loss, logits, guess = objective(head(batch), y[rows], epoch + start / len(order))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == y[rows]).sum())
        loss_mean, accuracy = loss_sum / len(x), correct / len(x)
        stuck = at_chance(loss_mean, accuracy, classes, guess)
        history.append({"epoch": epoch + 1, "loss": loss_mean, "train_accuracy": accuracy, "at_chance": stuck,
                        **_validate(head, val)})  # fmt: skip
        if progress is not None:
            progress(history[-1])
    return history


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (elsewhere autocast would be slower, not faster)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def sidecar(weights: Path) -> Path:
    return Path(str(weights) + ".json")
