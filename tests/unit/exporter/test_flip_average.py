"""``dpa export --flip-average``: dlib's head averages each image's descriptor with its mirror image's, inside
the graph, so the device, the public centre, projection and clip and the audit's rebuilt head all see the same
function. The reference is the plain torch twin run on the image and on its width-reversed copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpa.audit.victim import head_from_weights
from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import NetworkName
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, Manifest, load_manifest
from dpa.contract.ort_training import CheckpointState
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from exporter.export import ExportConfig, export
from exporter.networks import dlib_resnet as net
from exporter.networks.dlib import default_dat
from exporter.networks.family import RELEASE_PROJECTION
from runtime_client.head import HeadModel

K = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A flip-averaged, projected embedding export from synthetic 150-px public faces, and the plain twin."""
    root = tmp_path_factory.mktemp("flip")
    public = cached_faces(root, SynthConfig(identities=5, per_identity=3, size=150, seed=2))
    art = root / "art"
    cfg = ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=3), cut="embedding", out=art,
                       centre_faces=public, release_dims=K, release_whitening=0.4, flip_average=True,
                       verify=False)  # fmt: skip
    export(cfg)
    plain, _ = net.build_parts("embedding", num_classes=3)
    net.load_dat((plain, _), default_dat(), seed=0)
    return art, public, plain.eval()


def _twin(plain: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The reference: the plain descriptor of the image and of its mirror image, averaged, in float64."""
    with torch.no_grad():
        a = plain(torch.from_numpy(x)).double().numpy()
        b = plain(torch.from_numpy(np.ascontiguousarray(x[..., ::-1]))).double().numpy()
    return (a + b) / 2


def _public(public: Path, m: Manifest) -> np.ndarray:
    index = index_faces(public, min_faces_per_person=1)
    return load_batch(list(index.paths), size=m.image_size, mean=m.pixel_mean, std=m.pixel_std)


def test_the_device_head_is_the_mean_of_the_image_and_its_mirror(exported) -> None:
    art, public, plain = exported
    m = load_manifest(art, verify=("head",))
    assert m.flip_average and json.loads((art / "manifest.json").read_text())["flip_average"] is True
    x = _public(public, m)
    ref = _twin(plain, x)
    state = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
    w = state.parameters[f"{RELEASE_PROJECTION}.weight"].data.astype(np.float64)
    bias = state.parameters[f"{RELEASE_PROJECTION}.bias"].data.astype(np.float64)
    # the public centre is the mean of the flip-averaged descriptors, not of the plain ones
    np.testing.assert_allclose(-bias, w @ ref.mean(axis=0), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain_mean = plain(torch.from_numpy(x)).double().numpy().mean(axis=0)
    assert np.abs(w @ plain_mean + bias).max() > 100 * np.abs(w @ ref.mean(axis=0) + bias).max()
    device = HeadModel(art, m, resolve_device(DeviceProfile.CPU), frozen=True).forward(x).astype(np.float64)
    np.testing.assert_allclose(device, ref @ w.T + bias, rtol=1e-4, atol=1e-4 * np.abs(device).max())
    # a mirrored image gives the same output: the head is symmetric by construction
    mirrored = HeadModel(art, m, resolve_device(DeviceProfile.CPU), frozen=True).forward(
        np.ascontiguousarray(x[..., ::-1])
    )
    np.testing.assert_allclose(mirrored, device, rtol=1e-4, atol=1e-4 * np.abs(device).max())


def test_the_audit_rebuilds_the_mirrored_head(exported) -> None:
    art, public, _ = exported
    m = load_manifest(art)
    weights = dict(np.load(art / "head" / ARTIFACT_FILES.parameters))
    args = {
        "image_size": 150,
        "width": 1.0,
        "num_classes": 3,
        "cut": "embedding",
        "weights": weights,
        "pixel_mean": m.pixel_mean,
        "pixel_std": m.pixel_std,
        "source": "export",
        "network": "dlib-resnet",
    }
    x = _public(public, m)[:4]
    device = HeadModel(art, m, resolve_device(DeviceProfile.CPU), frozen=True).forward(x)
    with torch.no_grad():
        audit = head_from_weights(**args, mirror=True).module(torch.from_numpy(x)).numpy()
        unmirrored = head_from_weights(**args).module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(audit, device, rtol=1e-4, atol=1e-4 * np.abs(device).max())
    assert np.abs(unmirrored - device).max() > 1e-2 * np.abs(device).max()  # the flag matters


def test_flip_average_is_refused_where_it_has_no_meaning(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--flip-average is not available for vggface"):
        export(ExportConfig(cut="fc7", out=tmp_path / "a", flip_average=True))
    with pytest.raises(UserError, match="--flip-average with dlib-resnet needs --cut embedding"):
        export(ExportConfig(network=NetworkName.DLIB_RESNET, cut="res3", out=tmp_path / "b", flip_average=True,
                            verify=False))  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".*staging*"))


def test_the_manifest_field_round_trips_and_is_absent_when_off(exported) -> None:
    data = load_manifest(exported[0]).to_json()
    assert Manifest.from_json(data).flip_average is True
    off = {k: v for k, v in data.items() if k != "flip_average"}
    assert Manifest.from_json(off).flip_average is False
    assert "flip_average" not in Manifest.from_json(off).to_json()
    with pytest.raises(UserError, match="flip_average must be true or false, got 'yes'"):
        Manifest.from_json({**data, "flip_average": "yes"})
