"""Class sums over Flower (issue 25): 20 devices and 2 edge servers in Flower's simulation engine, checked
against a gallery built by hand from the same kept releases, with a dropped device and replayed releases."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from dpa.contract import wire
from dpa.contract.architecture import ArchConfig
from dpa.contract.manifest import OptimizerConfig
from dpa.federation.config import FederationConfig
from dpa.federation.device_app import RELEASE, device_dir
from dpa.federation.population import device_data
from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS

pytest.importorskip("flwr", reason="dpa federate needs the [federate] extra (the README's test command installs it)")

DEVICES, DROPPED = 20, 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from dpa.federation.simulation import federate
    from exporter.export import ExportConfig, export
    from exporter.pretrain import PRETRAIN_PIXEL_STD, public_faces

    root = tmp_path_factory.mktemp("federation")
    artifacts = root / "artifacts"
    centre = public_faces(root / "public", 6, 4, 64)
    export(ExportConfig(arch=ArchConfig(image_size=64, width=0.25, num_classes=6, dropout=0.0), cut="fc7",
                        optimizer=OptimizerConfig(lr=0.01), out=artifacts, weights=SHIPPED_WEIGHTS,
                        pixel_std=PRETRAIN_PIXEL_STD, centre_faces=centre, seed=0))  # fmt: skip
    cfg = FederationConfig(artifacts=artifacts, state_dir=root / "state", devices=DEVICES, identities_per_device=6,
                           shared_per_device=2, images_per_identity=4, edge_servers=2, rounds=2,
                           drop_devices=(DROPPED,), round_timeout_s=120, seed=0)  # fmt: skip
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = federate(cfg, say=lambda _msg: None)
    return cfg, report


def _kept_release(cfg: FederationConfig, device: int) -> tuple[np.ndarray, np.ndarray]:
    message = wire.decode((device_dir(cfg, device) / RELEASE).read_bytes())
    return message.tensors["class_sums"].astype(np.float64).reshape(6, -1), message.tensors["counts"].astype(np.float64)


def test_the_gallery_is_the_single_server_gallery_of_the_same_releases(federation):
    cfg, report = federation
    with np.load(report["gallery"]) as z:
        templates, counts = z["templates"], z["counts"]
    # By hand, from each device's kept release and which identities it holds (the population, not the report).
    sums = np.zeros((cfg.identities, templates.shape[1]))
    noisy_counts = np.zeros(cfg.identities)
    holders: dict[int, list[int]] = {}
    for device in range(DEVICES):
        if device == DROPPED:
            assert not (device_dir(cfg, device) / RELEASE).exists()  # it never released anything
            continue
        ids = list(device_data(cfg, device, 64).identities)
        s, c = _kept_release(cfg, device)
        for local, g in enumerate(ids):
            sums[g] += s[local]
            noisy_counts[g] += c[local]
            holders.setdefault(g, []).append(device)
    n = np.maximum(np.rint(noisy_counts), 0)
    want = np.where(n[:, None] > 0, sums / np.maximum(n, 1)[:, None], 0)
    np.testing.assert_array_equal(counts, n.astype(np.int64))
    np.testing.assert_allclose(templates, want, rtol=1e-5, atol=1e-4)
    # An identity enrolled from several devices carries the sum of all their releases (and only theirs).
    shared = next(g for g, h in holders.items() if len(h) >= 2)
    rows = [_kept_release(cfg, d) for d in holders[shared]]
    locals_ = [list(device_data(cfg, d, 64).identities).index(shared) for d in holders[shared]]
    both = sum(r[0][i] for r, i in zip(rows, locals_, strict=True))
    assert counts[shared] == round(sum(r[1][i] for r, i in zip(rows, locals_, strict=True)))
    np.testing.assert_allclose(templates[shared] * counts[shared], both, rtol=1e-5, atol=1e-3)
    assert report["releases"] == DEVICES - 1 and sum(report["per_edge_server"]) == DEVICES - 1
    assert report["per_edge_server"] == [10, 9]  # round-robin: device 3 (dropped) was edge server 1's


def test_a_dropped_device_is_reported_and_a_replayed_release_is_kept_once(federation):
    cfg, report = federation
    first, second = report["rounds"]
    assert first["missing"] == [DROPPED] == second["missing"]
    assert "device 3 dropped out" in first["errors"][str(DROPPED)]  # and why
    assert first["kept"] == [d for d in range(DEVICES) if d != DROPPED] and first["replayed"] == []
    assert first["seconds"] < cfg.round_timeout_s / 2  # the round did not wait for the dropped device
    assert second["kept"] == [] and second["replayed"] == first["kept"]  # the same bytes again: kept once
    assert not first["refused"] and not second["refused"]
    assert report["recognition"]["probes"] == (DEVICES - 1) * 6  # one held-out image per identity per device


def test_each_device_epsilon_is_what_dpa_privacy_says_for_its_release(federation):
    cfg, report = federation
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1)
    want = epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=1, delta=1e-5)
    assert set(report["accounts"]) == {str(d) for d in range(DEVICES) if d != DROPPED}
    for account in report["accounts"].values():
        assert account["noise_multiplier"] == pytest.approx(z, rel=1e-12)
        assert account["epsilon"] == pytest.approx(want, rel=1e-9) and account["epsilon"] <= 8.0
        assert account["delta"] == 1e-5


def test_splitfed_averages_the_edge_servers_tails_as_fedavg_does(tmp_path):
    """2 edge servers, 2 rounds: the tail Flower averaged equals FedAvg of two tails trained here in torch on
    the same kept releases (SGD at the manifest's rate, the same batches), weighted by examples."""
    import torch

    from dpa.contract.manifest import load_manifest
    from dpa.federation.splitfed import RELEASES, splitfed
    from exporter.export import ExportConfig, export
    from exporter.pretrain import PRETRAIN_PIXEL_STD, public_faces

    cfg = FederationConfig(artifacts=tmp_path / "artifacts", state_dir=tmp_path / "state", devices=8,
                           identities_per_device=4, shared_per_device=1, images_per_identity=4, edge_servers=2,
                           rounds=2, batch_size=4, seed=0)  # fmt: skip
    export(ExportConfig(arch=ArchConfig(image_size=64, width=0.25, num_classes=cfg.identities, dropout=0.0),
                        cut="fc7", optimizer=OptimizerConfig(lr=0.05), out=cfg.artifacts, weights=SHIPPED_WEIGHTS,
                        pixel_std=PRETRAIN_PIXEL_STD, centre_faces=public_faces(tmp_path / "public", 6, 4, 64),
                        seed=0))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = splitfed(cfg)
    with np.load(report["tail"]) as z:
        got = {k: z[k] for k in z.files}
    # The reference: the export's fc8 at its start, two rounds of (each edge server's SGD, then FedAvg).
    from dpa.contract.devices import DeviceProfile, resolve_device
    from runtime_server.tail import TailModel

    start = TailModel(cfg.artifacts, load_manifest(cfg.artifacts), resolve_device(DeviceProfile.CPU),
                      tmp_path / "ref").parameters()  # fmt: skip
    data = {}
    for d in range(cfg.devices):
        with np.load(device_dir(cfg, d) / RELEASES) as z:
            data[d] = (torch.from_numpy(z["activation"]), torch.from_numpy(z["labels"]))
    glob = {k: torch.from_numpy(v).double() for k, v in start.items()}
    for _ in range(cfg.rounds):
        tails, sizes = [], []
        for edge in range(cfg.edge_servers):
            w = {k: v.clone().requires_grad_(True) for k, v in glob.items()}
            n = 0
            for d in [d for d in range(cfg.devices) if cfg.edge_of(d) == edge]:
                act, labels = data[d]
                n += len(labels)
                for s in range(0, len(labels), cfg.batch_size):
                    logits = act[s : s + cfg.batch_size].double() @ w["fc8.weight"].T + w["fc8.bias"]
                    loss = torch.nn.functional.cross_entropy(logits, labels[s : s + cfg.batch_size])
                    names = sorted(w)
                    grads = torch.autograd.grad(loss, [w[k] for k in names])
                    with torch.no_grad():
                        w = {k: (w[k] - 0.05 * g).requires_grad_(True) for k, g in zip(names, grads, strict=True)}
            tails.append({k: v.detach() for k, v in w.items()})
            sizes.append(n)
        glob = {k: sum(t[k] * n for t, n in zip(tails, sizes, strict=True)) / sum(sizes) for k in glob}
    assert set(got) == set(glob) == {"fc8.weight", "fc8.bias"} and report["changed_from_start"]
    for k in glob:
        np.testing.assert_allclose(got[k], glob[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    # Accounting as on one server: each example released once, its label at 4 inside the whole-run epsilon 8.
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1, label_epsilon=4.0)
    for account in report["accounts"].values():
        assert account["noise_multiplier"] == pytest.approx(z, rel=1e-12) and account["epsilon"] <= 8.0 + 1e-9
