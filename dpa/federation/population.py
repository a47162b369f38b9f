"""Who holds which faces: each device's identities (global gallery ids) and its images of them.

Built-in faces only. Every device has ``own_per_device`` identities nobody else holds and
``shared_per_device`` from a shared pool, which several devices enrol, each from images of its own
(identity g of the pool on device i gets that device's slice of g's images). Devices' identities are
public metadata of the federation (which enrolment ids a device holds); what the release protects is
every example and its label among them, as on one server.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from dpa.faces.lfw import FaceIndex, index_faces
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.federation.config import FederationConfig

__all__ = ["DeviceData", "device_data", "draw_faces", "OWN_SEED", "SHARED_SEED"]

#: Generator seeds of the devices' faces: own identities (the devices' seed, as one dpa client's) and the pool.
OWN_SEED, SHARED_SEED = 0, 5


@dataclass(frozen=True)
class DeviceData:
    device: int
    identities: tuple[int, ...]  # global gallery id of each local label 0..k-1, ascending
    train: FaceIndex  # local labels
    test: FaceIndex


def draw_faces(cfg: FederationConfig, image_size: int) -> None:
    """Draw the simulated devices' faces once, before any device starts (devices running at once would
    otherwise race to draw the same cache)."""
    _faces(cfg, image_size)


@cache
def _faces(cfg: FederationConfig, image_size: int) -> tuple[FaceIndex, FaceIndex | None]:
    """Every simulated device's faces, indexed once per process: indexing scans all the devices' files
    (0.3 s at 100 devices), which every device's every answer would otherwise pay again."""
    root = cfg.state_dir / "faces"
    own = index_faces(cached_faces(root, SynthConfig(identities=cfg.devices * cfg.own_per_device,
                                                     per_identity=cfg.images_per_identity, size=image_size,
                                                     seed=OWN_SEED)), min_faces_per_person=1)  # fmt: skip
    if not cfg.shared_pool:
        return own, None
    holders = -(-cfg.devices * cfg.shared_per_device // cfg.shared_pool)  # devices per pooled identity, at most
    shared = cached_faces(root, SynthConfig(identities=cfg.shared_pool, per_identity=holders * cfg.images_per_identity,
                                            size=image_size, seed=SHARED_SEED))  # fmt: skip
    return own, index_faces(shared, min_faces_per_person=1)


def device_data(cfg: FederationConfig, device: int, image_size: int) -> DeviceData:
    own, shared = _faces(cfg, image_size)
    per = cfg.images_per_identity
    held = max(1, per // 4)
    items: list[tuple[int, list[Path]]] = []
    for j in range(cfg.own_per_device):
        label = device * cfg.own_per_device + j
        items.append((label, [Path(p) for p, y in zip(own.paths, own.labels, strict=True) if y == label]))
    for j in range(cfg.shared_per_device):
        pooled = (device * cfg.shared_per_device + j) % cfg.shared_pool
        assert shared is not None
        turn = (device * cfg.shared_per_device + j) // cfg.shared_pool  # the how-manieth holder of this identity
        paths = [Path(p) for p, y in zip(shared.paths, shared.labels, strict=True) if y == pooled]
        items.append((cfg.devices * cfg.own_per_device + pooled, paths[turn * per : (turn + 1) * per]))
    items.sort()
    split: dict[bool, tuple[list[Path], list[int]]] = {True: ([], []), False: ([], [])}
    for local, (_, paths) in enumerate(items):
        for k, p in enumerate(sorted(paths)):
            split[k >= len(paths) - held][0].append(p)
            split[k >= len(paths) - held][1].append(local)
    names = tuple(f"id{g:05d}" for g, _ in items)

    def index(test: bool) -> FaceIndex:
        return FaceIndex(
            root=cfg.state_dir / "faces",
            paths=tuple(split[test][0]),
            labels=np.asarray(split[test][1], dtype=np.int64),
            names=names,
        )

    return DeviceData(device, tuple(g for g, _ in items), index(False), index(True))
