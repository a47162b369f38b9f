"""The server's view, on record: exactly what an honest-but-curious edge server received.

A recorded view lets anyone outside the project attack a real run. ``docs/server_view.md``
describes the format for readers in any language; this module is its one owner:

    DIR/view.json               public parameters, one entry per recorded release (rewritten atomically)
    DIR/release-000001.npz      "activation": the release exactly as sent (wire dtype), "labels": as sent
    DIR/heads/<sha256>.npz      the head's parameters that produced a release (float32, by graph name)
    DIR/release_centre.npy      with a centred export: the public constant subtracted before clipping
    DIR/truth.json              device-only: the source images and true labels of each release, for
                                scoring an attack; the server never saw it

Heads are stored by content hash, so a frozen head is stored once however many releases it made.
Every file is written whole (temp file, fsync, rename) before ``view.json`` names it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError

__all__ = ["VIEW_FORMAT", "VIEW_VERSION", "ViewRecorder", "RecordedView", "load_view", "ClassSumViewFiles"]

VIEW_FORMAT = "dpa-server-view"
VIEW_VERSION = 1
VIEW_FILE = "view.json"
TRUTH_FILE = "truth.json"
HEADS_DIR = "heads"
CENTRE_FILE = "release_centre.npy"


class ClassSumViewFiles:
    """The files of a class-sum view (docs/server_view.md, "A class-sum view"): its writer, the
    device, and its reader, the audit, take the names from here."""

    BODY = "class_sums.wire"  # the request's body as sent
    HEAD = "head.npz"  # the frozen head's parameters
    CENTRE = "centre.npy"  # the public release centre (absent if none)
    HEADER = "header.json"  # kind, cut, shapes, preprocessing, clip, noise
    TRUTH = "members.json"  # device-only: {"members": {class: [paths]}, "held_out": {class: [paths]}}


def _json_number(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(float(x))


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _head_digest(params: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype=np.float32)
        h.update(name.encode() + b"\0" + str(a.shape).encode() + b"\0" + a.tobytes())
    return h.hexdigest()


class ViewRecorder:
    """Writes a view as releases are sent. ``header``: the run's public parameters (see docs).

    ``limit`` caps the number of recorded releases (None: all). A folder that already holds a view
    is refused unless ``append`` (a resumed device continues its record)."""

    def __init__(
        self, directory: Path, header: Mapping[str, Any], *, limit: int | None = None, append: bool = False
    ) -> None:
        if limit is not None and limit < 0:
            raise UserError(f"the view's release limit must be >= 0, got {limit}")
        self.directory = Path(directory)
        self.limit = limit
        index = self.directory / VIEW_FILE
        if index.exists() and not append:
            raise UserError(f"{self.directory} already holds a recorded view; give an empty folder")
        (self.directory / HEADS_DIR).mkdir(parents=True, exist_ok=True)
        if index.exists():
            self._view = json.loads(index.read_text())
            self._truth = json.loads((self.directory / TRUTH_FILE).read_text())
        else:
            # record_limit: --record-view-limit (None: every release); "truncated" is added, true, once a
            # release past it was not recorded, so a reader knows the view is not the whole run.
            self._view = {"format": VIEW_FORMAT, "version": VIEW_VERSION, **dict(header), "record_limit": limit,
                          "truncated": False, "releases": []}  # fmt: skip
            self._truth = {"note": "device-only: never sent to the server; for scoring attacks", "releases": {}}
        self._heads: set[str] = {p.stem for p in (self.directory / HEADS_DIR).glob("*.npz")}

    def write_centre(self, centre: np.ndarray | None) -> None:
        """Record the export's public release centre (the head's output minus it is what was clipped)."""
        if centre is None:
            return
        buf = io.BytesIO()
        np.save(buf, np.asarray(centre, dtype=np.float32))
        atomic_write_bytes(self.directory / CENTRE_FILE, buf.getvalue())
        self._view["release_centre"] = CENTRE_FILE

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self._view["releases"]) >= self.limit

    def skip(self, step: int) -> None:
        """A release past the limit went unrecorded: ``view.json`` says so (``truncated``), once."""
        on_record = self._view["releases"]
        if not self._view.get("truncated") and (not on_record or step > on_record[-1]["step"]):
            self._view["truncated"] = True
            atomic_write_bytes(self.directory / VIEW_FILE, (json.dumps(self._view, indent=1) + "\n").encode())

    def record(
        self,
        *,
        step: int,
        activation: np.ndarray,
        labels: np.ndarray,
        head: Mapping[str, np.ndarray],
        release: Mapping[str, Any],
        sources: list[str] | None = None,
        true_labels: np.ndarray | None = None,
    ) -> bool:
        """Record one release (``activation`` and ``labels`` exactly as they went on the wire).

        ``release``: its public parameters (mechanism, clip, noise_std, release_scale, epsilon, delta...).
        Returns False (nothing written) once ``limit`` releases are on record."""
        if self.full:
            self.skip(step)
            return False
        releases = self._view["releases"]
        if releases and releases[-1]["step"] >= step:  # a retried or replayed step: already on record
            return True
        digest = _head_digest(head)
        if digest not in self._heads:
            params = {k: np.asarray(v, dtype=np.float32) for k, v in head.items()}
            atomic_write_bytes(self.directory / HEADS_DIR / f"{digest}.npz", _npz_bytes(params))
            self._heads.add(digest)
        name = f"release-{step:06d}.npz"
        atomic_write_bytes(self.directory / name, _npz_bytes({"activation": activation, "labels": labels}))
        entry = {
            "step": int(step),
            "file": name,
            "examples": int(activation.shape[0]),
            "wire_dtype": np.dtype(activation.dtype).name,
            "head": f"{HEADS_DIR}/{digest}.npz",
            **{k: (_json_number(v) if isinstance(v, float) else v) for k, v in release.items()},
        }
        releases.append(entry)
        if sources is not None:
            truth: dict[str, Any] = {"sources": list(sources)}
            if true_labels is not None:
                truth["labels"] = [int(v) for v in np.asarray(true_labels).reshape(-1)]
            self._truth["releases"][name] = truth
            atomic_write_bytes(self.directory / TRUTH_FILE, (json.dumps(self._truth, indent=1) + "\n").encode())
        atomic_write_bytes(self.directory / VIEW_FILE, (json.dumps(self._view, indent=1) + "\n").encode())
        return True


def _number(x: Any) -> float:
    return float(x)  # "inf" strings too


@dataclass(frozen=True, eq=False)
class RecordedView:
    directory: Path
    header: dict[str, Any]
    releases: tuple[dict[str, Any], ...]
    truth: dict[str, dict[str, Any]]

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(activation as sent, labels as sent) of release ``i``."""
        with np.load(self.directory / self.releases[i]["file"], allow_pickle=False) as z:
            return z["activation"], z["labels"]

    def head(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.directory / self.releases[i]["head"], allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def centre(self) -> np.ndarray | None:
        """The public release centre the device subtracted, or None (not centred)."""
        name = self.header.get("release_centre")
        return None if name is None else np.load(self.directory / name, allow_pickle=False)

    def parameter(self, i: int, name: str) -> float:
        return _number(self.releases[i][name])

    def sources(self, i: int) -> list[str] | None:
        """The device's source images of release ``i`` (from truth.json; None if not recorded)."""
        entry = self.truth.get(self.releases[i]["file"])
        return None if entry is None else list(entry["sources"])

    def true_labels(self, i: int) -> np.ndarray | None:
        """The true labels of release ``i`` (from truth.json; None if not recorded)."""
        entry = self.truth.get(self.releases[i]["file"])
        return None if entry is None or "labels" not in entry else np.asarray(entry["labels"], dtype=np.int64)


def load_view(directory: Path) -> RecordedView:
    """Read a recorded view; a clear error if it is missing, foreign or names files that are not there."""
    directory = Path(directory)
    index = directory / VIEW_FILE
    try:
        view = json.loads(index.read_text())
    except FileNotFoundError:
        raise UserError(f"no recorded view at {directory} (no {VIEW_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{index} is not a readable view: {exc}") from None
    if not isinstance(view, dict) or view.get("format") != VIEW_FORMAT:
        raise UserError(f"{index} is not a {VIEW_FORMAT} file")
    if view.get("version") != VIEW_VERSION:
        raise UserError(f"{index} has view version {view.get('version')}; this dpa reads {VIEW_VERSION}")
    releases = tuple(view.pop("releases", []))
    for r in releases:
        for key in ("file", "head"):
            if not (directory / r[key]).is_file():
                raise UserError(f"{index} names {r[key]}, which is not in {directory}")
    truth_file = directory / TRUTH_FILE
    truth = json.loads(truth_file.read_text())["releases"] if truth_file.is_file() else {}
    return RecordedView(directory, view, releases, truth)
