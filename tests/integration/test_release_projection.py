"""A public projection before the release (``dpa export --release-dims``): the head ends in the top principal
directions of public activations, frozen; releases are k-dimensional under the same sensitivity 2C; the
server, the device's templates and the audit's rebuilt head all work in those k dimensions."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
import torch

from dpa.audit.victim import head_from_weights
from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, Manifest, load_manifest
from dpa.contract.ort_training import CheckpointState
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.class_sums import class_sums_sensitivity, contributions
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.privacy.mechanism import DPConfig
from exporter.export import VGGFACE_MEAN, ExportConfig, export
from exporter.vggface import RELEASE_PROJECTION, build_parts, init_weights
from runtime_client.config import ClientConfig
from runtime_client.head import HeadModel
from runtime_client.trainer import run_training

ARCH = ArchConfig(image_size=32, width=0.25, num_classes=4, dropout=0.0)
K = 5


@pytest.fixture(scope="module")
def projected(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("projection")
    public = cached_faces(root, SynthConfig(identities=6, per_identity=4, size=32, seed=1))
    art = root / "art"
    export(ExportConfig(arch=ARCH, cut="fc7", out=art, centre_faces=public, release_dims=K, seed=3))
    return art, public, root


def _images(folder):  # type: ignore[no-untyped-def]
    index = index_faces(folder, min_faces_per_person=1)
    return index, load_batch(list(index.paths), size=32, mean=VGGFACE_MEAN, std=(64.0,) * 3)


def test_the_head_ends_in_the_public_principal_directions_frozen(projected):
    art, public, _ = projected
    m = load_manifest(art, verify=("head", "tail"))
    assert m.activation_shape == (K,) and m.release_dims == K and m.release_centre is None
    # The reference: the same seeded network without the projection, in torch, and numpy's SVD.
    head, tail = build_parts(ARCH, "fc7")
    init_weights((head, tail), 3)
    _, x = _images(public)
    with torch.no_grad():
        a = head.eval()(torch.from_numpy(x)).double().numpy()
    mu = a.mean(axis=0)
    _, _, vt = np.linalg.svd(a - mu, full_matrices=False)
    state = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
    w = state.parameters[f"{RELEASE_PROJECTION}.weight"]
    assert not w.requires_grad and state.parameters["fc7.weight"].requires_grad
    w = w.data.astype(np.float64)
    np.testing.assert_allclose(np.abs(w @ vt[:K].T), np.eye(K), atol=1e-4)  # the top K directions, up to sign
    device = HeadModel(art, m, resolve_device(DeviceProfile.CPU)).forward(x).astype(np.float64)
    np.testing.assert_allclose(device, (a - mu) @ w.T, rtol=1e-4, atol=1e-4 * np.abs(device).max())
    assert m.release_clip == pytest.approx(0.5 * np.median(np.linalg.norm(device, axis=1)), rel=1e-4)


def test_a_whitened_projection_scales_each_direction_by_its_public_spread(projected, tmp_path):
    """--release-whitening w: row i of the projection is the i-th public principal direction times
    (s_i / s_1) ** -w, s numpy's singular values of the centred public activations (w = 1: the projected public
    activations have equal variance in every direction)."""
    _, public, _ = projected
    head, tail = build_parts(ARCH, "fc7")
    init_weights((head, tail), 3)
    _, x = _images(public)
    with torch.no_grad():
        a = head.eval()(torch.from_numpy(x)).double().numpy()
    _, s, vt = np.linalg.svd(a - a.mean(axis=0), full_matrices=False)
    for w in (0.4, 1.0):
        art = tmp_path / f"w{w}"
        export(ExportConfig(arch=ARCH, cut="fc7", out=art, centre_faces=public, release_dims=K, seed=3,
                            release_whitening=w))  # fmt: skip
        state = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
        weight = state.parameters[f"{RELEASE_PROJECTION}.weight"].data.astype(np.float64)
        np.testing.assert_allclose(np.abs(weight @ vt[:K].T), np.diag((s[:K] / s[0]) ** -w), rtol=1e-3, atol=1e-4)
    projected_public = (a - a.mean(axis=0)) @ weight.T  # w = 1
    np.testing.assert_allclose(projected_public.std(axis=0) / projected_public.std(axis=0)[0], 1.0, rtol=1e-3)


def test_a_trained_head_never_moves_its_projection(projected):
    art, public, _ = projected
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device(DeviceProfile.CPU))
    before = head.parameters()
    _, x = _images(public)
    head.backward_step(x[:4], np.random.default_rng(0).standard_normal((4, K)).astype(np.float32))
    after = head.parameters()
    np.testing.assert_array_equal(after[f"{RELEASE_PROJECTION}.weight"], before[f"{RELEASE_PROJECTION}.weight"])
    np.testing.assert_array_equal(after[f"{RELEASE_PROJECTION}.bias"], before[f"{RELEASE_PROJECTION}.bias"])
    assert not np.array_equal(after["fc7.weight"], before["fc7.weight"])  # the step did happen


def test_replacing_one_example_moves_the_projected_sums_by_at_most_2c_brute_force(projected):
    """Every neighbour of a small data set (each example replaced by each candidate under each label),
    through the device's own head, clip and sums: the largest move is 2C, never more."""
    art, public, root = projected
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device(DeviceProfile.CPU))
    c = float(m.release_clip)  # type: ignore[arg-type]

    def clipped(x):  # type: ignore[no-untyped-def]
        a = head.forward(x)
        return scale_examples(a, clip_factors(l2_norms(a), clip=c))

    _, x = _images(cached_faces(root, SynthConfig(identities=3, per_identity=4, size=32, seed=0)))
    _, pool = _images(cached_faces(root, SynthConfig(identities=2, per_identity=3, size=32, seed=7)))
    data, candidates = clipped(x), clipped(np.concatenate([pool, x[:1] * 0.0]))  # a black image too
    labels = np.arange(len(data)) % m.num_classes
    base = contributions(data, labels, m.num_classes, c)
    moves = [
        float(np.linalg.norm(contributions(np.where(np.arange(len(data))[:, None] == i, cand, data),
                                           np.where(np.arange(len(data)) == i, label, labels),
                                           m.num_classes, c) - base))
        for i in range(len(data)) for cand in candidates for label in range(m.num_classes)
    ]  # fmt: skip
    assert max(moves) <= class_sums_sensitivity(c) * (1 + 1e-6)
    assert max(moves) == pytest.approx(2 * c, rel=1e-3)  # attained: two full-norm examples under two labels


def test_bad_projections_are_refused_and_leave_nothing(projected, tmp_path):
    _, public, _ = projected
    with pytest.raises(UserError, match="--release-dims needs --centre-from"):
        export(ExportConfig(arch=ARCH, cut="fc7", out=tmp_path / "a", release_dims=3))
    with pytest.raises(UserError, match=r"--release-dims 30: the 24 public faces .* give at most 23"):
        export(ExportConfig(arch=ARCH, cut="fc7", out=tmp_path / "b", centre_faces=public, release_dims=30))
    with pytest.raises(UserError, match=r"--release-whitening must be in \[0, 1\], got 1.5"):
        export(ExportConfig(arch=ARCH, cut="fc7", out=tmp_path / "c", centre_faces=public, release_dims=3,
                            release_whitening=1.5))  # fmt: skip
    with pytest.raises(UserError, match="--release-whitening needs --release-dims"):
        export(ExportConfig(arch=ARCH, cut="fc7", out=tmp_path / "d", centre_faces=public, release_whitening=0.5))
    from typer.testing import CliRunner

    from dpa.cli.app import app

    result = CliRunner().invoke(app, ["export", "--cut", "fc7", "--release-whitening", "nan", "--out",
                                      str(tmp_path / "e")], terminal_width=200)  # fmt: skip
    assert result.exit_code == 2 and "--release-whitening must be in [0, 1], got nan" in result.output
    assert not any((tmp_path / n).exists() for n in "abcde")
    assert not list(tmp_path.glob(".b.staging-*"))
    with pytest.raises(UserError, match="release_dims 5 does not match its activation_shape"):
        Manifest.from_json({**load_manifest(projected[0]).to_json(), "activation_shape": [1024]})


def test_a_projected_class_sum_run_enrols_through_the_server_and_the_audit_rebuilds_its_head(
    projected, start_server, tmp_path
):  # fmt: skip
    art, _, _ = projected
    m = load_manifest(art)
    server = start_server(art, checkpoint_every=1000)
    cfg = ClientConfig(
        server=server.url, artifacts=art, dp=DPConfig(clip=float(m.release_clip), epsilon=None), total_epsilon=8.0,
        frozen_head=True, on_device_templates=True, release="class-sums",
        synth=SynthConfig(identities=4, per_identity=6, size=32), progress=False, seed=1,
        state_dir=tmp_path / "client", record_view=tmp_path / "view",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = asyncio.run(run_training(cfg))
    assert report["privacy"]["total"]["releases"] == 1 and 0.0 <= report["on_device"]["test_accuracy"] <= 1.0
    with np.load(tmp_path / "view" / "head.npz") as z:
        weights = {k: z[k] for k in z.files}
    rebuilt = head_from_weights(image_size=32, width=0.25, num_classes=4, cut="fc7", weights=weights,
                                pixel_mean=m.pixel_mean, pixel_std=m.pixel_std, source="view")  # fmt: skip
    assert rebuilt.activation_shape == (K,)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        audit = rebuilt.module(torch.from_numpy(x)).numpy()
    device = HeadModel(art, m, resolve_device(DeviceProfile.CPU)).forward(x)
    np.testing.assert_allclose(audit, device, rtol=1e-4, atol=1e-4 * np.abs(device).max())
