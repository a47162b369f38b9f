"""A recorded view read as docs/server_view.md describes it, by a reader written from that page alone.

No ``dpa.contract.server_view`` here: ``view.json`` with ``json``, the ``.npz`` files with ``zipfile``
and ``numpy.lib.format``, the head file's name rebuilt with ``hashlib`` from the documented encoding.
Then the documented release formula, ``s * round_g(clip_C(head(x) - centre) + n)``, is checked
against the files: every value on the grid g, and the residual after subtracting the clipped
centred activation is noise of the documented std (issue 27 found the page and the files apart).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
from conftest import export_small

from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.manifest import load_manifest
from dpa.faces.lfw import load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig
from runtime_client.head import HeadModel
from runtime_client.trainer import run_training


def _npz(path: Path) -> dict[str, np.ndarray]:
    """An .npz as the page says it is: a zip of .npy files."""
    with zipfile.ZipFile(path) as z:
        return {n.removesuffix(".npy"): np.lib.format.read_array(io.BytesIO(z.read(n))) for n in z.namelist()}


def _head_sha256(params: dict[str, np.ndarray]) -> str:
    """The documented digest: sorted names; name, 0x00, the shape as a Python tuple, 0x00, float32 LE bytes."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype="<f4")
        shape = "(" + ", ".join(str(d) for d in a.shape) + ("," if a.ndim == 1 else "") + ")"
        h.update(name.encode() + b"\0" + shape.encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def test_a_view_read_from_the_doc_matches_its_formula(start_server, tmp_path):
    faces = cached_faces(tmp_path / "public", SynthConfig(identities=4, per_identity=4, seed=1))
    art = export_small(tmp_path / "art", centre_faces=faces)
    server = start_server(art)
    dp = DPConfig(clip=20.0, epsilon=1e6, delta=1e-5)  # noise far below the activations: a missing centre shows
    cfg = ClientConfig(
        server=server.url, artifacts=art, epochs=1, batch_size=4, dp=dp, label_epsilon=4.0, frozen_head=True,
        synth=SynthConfig(identities=6, per_identity=8), max_steps_per_epoch=3, progress=False, seed=5,
        state_dir=tmp_path / "client", record_view=tmp_path / "view", record_view_limit=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.run(run_training(cfg))
    root = tmp_path / "view"
    view = json.loads((root / "view.json").read_text())
    assert view["format"] == "dpa-server-view" and view["version"] == 1
    assert view["labels"] == {"mechanism": "rr-with-prior", "epsilon": 4.0}
    assert view["record_limit"] == 2 and view["truncated"] is True and len(view["releases"]) == 2  # 3 were sent
    centre = np.lib.format.read_array(io.BytesIO((root / view["release_centre"]).read_bytes()))
    assert centre.shape == tuple(view["activation_shape"]) and centre.dtype == np.float32
    truth = json.loads((root / "truth.json").read_text())["releases"]

    manifest = load_manifest(art)
    head = HeadModel(art, manifest, resolve_device(DeviceProfile.CPU))  # the device's own activation
    for entry in view["releases"]:
        assert entry["label_epsilon"] == 4.0
        params = _npz(root / entry["head"])
        assert entry["head"] == f"heads/{_head_sha256(params)}.npz"  # the file's name is its documented digest
        arrays = _npz(root / entry["file"])
        y, labels = arrays["activation"].astype(np.float64), arrays["labels"]
        assert labels.dtype == np.int64 and y.shape == (entry["examples"], *view["activation_shape"])
        sigma, s = entry["noise_std"], entry["release_scale"]
        g = 2.0 ** (math.floor(math.log2(sigma)) - 12)
        on_grid = y / s / g
        np.testing.assert_allclose(on_grid, np.rint(on_grid), atol=1e-3)  # round_g, then times s
        x = load_batch([Path(p) for p in truth[entry["file"]]["sources"]], size=view["image_size"],
                       mean=view["pixel_mean"], std=view["pixel_std"])  # fmt: skip
        raw = head.embed(x).astype(np.float64)  # head(x), the export's graph, before any centring
        a = raw - centre  # the documented release: clip_C(head(x) - centre)
        norms = np.linalg.norm(a.reshape(len(a), -1), axis=1).reshape(-1, *[1] * (a.ndim - 1))
        clipped = a * np.minimum(1.0, entry["clip"] / norms)
        residual = y / s - clipped
        assert abs(residual.mean()) < 0.01 * sigma and abs(residual.std() / sigma - 1) < 0.02, residual.std() / sigma
        uncentred = raw * np.minimum(1.0, entry["clip"] / np.linalg.norm(raw.reshape(len(raw), -1), axis=1)).reshape(
            norms.shape
        )
        assert (y / s - uncentred).std() > 1.5 * sigma  # the old page's formula does not fit the files
