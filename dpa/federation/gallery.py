"""The edge servers' side of a federation: keep each device's release once, combine one identity's sums
across devices and edge servers into one template (``runtime_server.class_sums``, as ``dpa serve`` keeps them).

Each edge server keeps its devices' releases in its own ``ClassSumStore`` (durable, one file per device,
recognised by its bytes when it comes again: a retried round, a restarted server or a replayed message is
kept once). A release arrives as the bytes ``dpa serve`` would receive at ``/class-sums`` for the device's
export and is checked the same way (``runtime_server.validation``); its rows go to the gallery rows of the
device's identities. The gallery is then the sum over edge servers of their sums and counts, through the
one template rule (``dpa.privacy.class_sums.class_templates``): an identity enrolled from two devices gets
the sum of both releases, over the sum of both noisy counts.
"""

from __future__ import annotations

import numpy as np

from dpa.contract import wire
from dpa.contract.manifest import Manifest
from dpa.federation.config import FederationConfig
from dpa.privacy.class_sums import class_templates
from runtime_server.class_sums import ClassSumStore, ReleaseConflict
from runtime_server.errors import ApiError
from runtime_server.validation import validate_class_sums

__all__ = ["Gallery", "Refused"]


class Refused(Exception):
    """A release this federation does not keep (malformed, another export's, or a second draw)."""


class Gallery:
    def __init__(self, cfg: FederationConfig, manifest: Manifest) -> None:
        self.cfg, self.manifest = cfg, manifest
        d = manifest.activation_numel
        self.stores = [ClassSumStore(cfg.state_dir / f"edge-{k}", cfg.identities, d) for k in range(cfg.edge_servers)]

    def keep(self, device: int, identities: list[int], body: bytes) -> bool:
        """Keep a device's release at its edge server; False: these bytes were kept already (a replay)."""
        try:
            sums, counts = validate_class_sums(self.manifest, wire.decode(body))
        except (ApiError, ValueError) as exc:
            raise Refused(f"device {device}: {getattr(exc, 'message', exc)}") from None
        ids = np.asarray(identities, dtype=np.int64)
        if (
            ids.shape != (self.manifest.num_classes,)
            or len(set(identities)) != len(identities)
            or (ids.min() < 0 or ids.max() >= self.cfg.identities)
        ):
            raise Refused(f"device {device}: {len(identities)} identities that do not map its classes to the gallery")
        flat = np.asarray(sums, dtype=np.float64).reshape(len(ids), -1)
        try:
            store = self.stores[self.cfg.edge_of(device)]
            return store.add(f"device-{device:04d}", body, flat, np.asarray(counts, dtype=np.float64), rows=ids)
        except ReleaseConflict:
            raise Refused(f"device {device} sent another release than the one kept: a second draw of noise") from None

    @property
    def releases(self) -> int:
        return sum(len(s) for s in self.stores)

    def templates(self) -> tuple[np.ndarray, np.ndarray]:
        """(templates float32 (identities, d), counts int64) over every edge server's releases."""
        return class_templates(sum(s.sums for s in self.stores), sum(s.counts for s in self.stores))
