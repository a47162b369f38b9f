"""--record-view: the recorded view holds, byte for byte, what the real server received.

The independent reference is the server's own write-ahead journal, which keeps every applied
step's request exactly as it arrived on the socket."""

from __future__ import annotations

import asyncio
import json
import warnings

import numpy as np
import pytest

from dpa.contract.manifest import ARTIFACT_FILES, GraphNames, load_manifest, manifest_sha256
from dpa.contract.ort_training import CheckpointState
from dpa.contract.server_view import ViewRecorder, load_view
from dpa.contract.wire import ReleaseDtype
from dpa.faces.synth import SynthConfig
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.public_parameters import config_from_parameters
from runtime_client.config import ClientConfig
from runtime_client.trainer import run_training
from runtime_server.journal import Journal

STEPS = 3


@pytest.mark.parametrize(
    ("dtype", "micro_batch"), [(ReleaseDtype.FLOAT32, None), (ReleaseDtype.FLOAT16, None), (ReleaseDtype.FLOAT32, 1)]
)
def test_view_is_byte_identical_to_what_the_server_journalled(small_export, start_server, tmp_path, dtype, micro_batch):
    server = start_server(small_export, checkpoint_every=1000)  # the journal keeps every step
    dp = DPConfig(clip=50.0, epsilon=1e5, delta=1e-5)
    cfg = ClientConfig(
        server=server.url, artifacts=small_export, epochs=1, batch_size=4, dp=dp,
        synth=SynthConfig(identities=6, per_identity=8), max_steps_per_epoch=STEPS, progress=False, seed=3,
        state_dir=tmp_path / "client", release_dtype=dtype, micro_batch=micro_batch, record_view=tmp_path / "view",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = asyncio.run(run_training(cfg))
    assert report["view"] == str(tmp_path / "view")
    view = load_view(tmp_path / "view")
    entries = Journal(server.state.config.state_dir).entries()
    assert len(entries) == len(view.releases) == STEPS
    for i, entry in enumerate(entries):
        received = Journal.read(entry).tensors
        activation, labels = view.arrays(i)
        assert activation.dtype == dtype.numpy and activation.tobytes() == received[GraphNames.ACTIVATION].tobytes()
        assert labels.tobytes() == received[GraphNames.LABELS].tobytes()
        assert view.releases[i]["step"] == i + 1 and view.releases[i]["wire_dtype"] == dtype.value
        assert len(view.sources(i)) == 4
    manifest = load_manifest(small_export)
    assert view.header["manifest_sha256"] == manifest_sha256(small_export) and view.header["cut"] == manifest.cut
    # The public parameters rebuild the device's mechanism exactly.
    rebuilt = config_from_parameters(view.releases[0], manifest.activation_numel)
    assert rebuilt.noise_std == dp.noise_std and rebuilt.release_scale(manifest.activation_numel) == pytest.approx(
        dp.release_scale(manifest.activation_numel), rel=1e-12
    )
    # The first release was made by the export's initial head; later ones by the trained head.
    initial = CheckpointState.load_checkpoint(str(small_export / "head" / ARTIFACT_FILES.checkpoint))
    first = view.head(0)
    for name, p in initial.parameters:
        np.testing.assert_array_equal(first[name], np.array(p.data))
    assert view.releases[1]["head"] != view.releases[0]["head"]


def test_a_view_refuses_a_used_folder_and_caps_its_records(tmp_path):
    header = {"cut": "conv1_1"}
    rec = ViewRecorder(tmp_path / "v", header, limit=1)
    head = {"w": np.ones(3, np.float32)}
    kw = {"head": head, "release": {"epsilon": float("inf")}, "labels": np.zeros(2, np.int64)}
    assert rec.record(step=1, activation=np.zeros((2, 3), np.float32), **kw)
    assert not rec.record(step=2, activation=np.ones((2, 3), np.float32), **kw)  # over the limit
    view = json.loads((tmp_path / "v" / "view.json").read_text())
    assert view["format"] == "dpa-server-view" and view["releases"][0]["epsilon"] == "inf"
    assert len(view["releases"]) == 1
    with pytest.raises(ValueError, match="already holds a recorded view"):
        ViewRecorder(tmp_path / "v", header)
    (tmp_path / "v" / "release-000001.npz").unlink()
    with pytest.raises(ValueError, match="names release-000001.npz, which is not in"):
        load_view(tmp_path / "v")
    with pytest.raises(ValueError, match="no recorded view"):
        load_view(tmp_path / "nothing")
