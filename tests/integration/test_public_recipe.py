"""The public-features recipe: pretraining on public identities only, centred releases, a frozen head
released K times, the server's class templates, and the device classifying clean inputs with them."""

from __future__ import annotations

import asyncio
import math
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from dpa.audit.victim import TrainedSplitModel
from dpa.contract.architecture import ArchConfig
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, GraphNames, OptimizerConfig, OptimizerName, load_manifest
from dpa.contract.ort_training import CheckpointState
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, identity_names
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.privacy.label_accounting import combined_epsilon
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_clip import release_clip
from dpa.runs.loopback import serve_and_train
from exporter.export import ExportConfig, export
from exporter.pretrain import PUBLIC_SEED, PretrainConfig, pretrain, public_faces
from runtime_client.config import ClientConfig
from runtime_client.head import HEAD_CHECKPOINT, load_head_checkpoint
from runtime_client.on_device import template_scores
from runtime_client.trainer import run_training
from runtime_server.journal import Journal
from runtime_server.templates import TEMPLATES_FILE

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=6, dropout=0.0)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Pretrained (8 public identities x 6 images, 4 epochs) and exported at pool5 with a public centre."""
    root = tmp_path_factory.mktemp("recipe")
    info = pretrain(PretrainConfig(out=root / "w.pt", identities=8, per_identity=6, epochs=4, cache_dir=root / "pub"))
    art = root / "art"
    optimizer = OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3)
    centre = public_faces(root / "pub", 8, 6, 64)
    export(ExportConfig(arch=ARCH, cut="pool5", optimizer=optimizer, out=art, weights=root / "w.pt", pixel_std=64.0,
                        centre_faces=centre))  # fmt: skip
    return root, info, art


def test_pretraining_uses_no_device_identity(recipe):
    _, info, _ = recipe
    devices = set(identity_names(SynthConfig(identities=40, per_identity=2, seed=0)))
    assert info["public_seed"] == PUBLIC_SEED != 0
    assert len(info["identities"]) == 8 and not set(info["identities"]) & devices
    assert info["history"][-1]["loss"] < info["history"][0]["loss"] + 1.0


def test_centred_releases_subtract_the_public_centre_before_clipping(recipe):
    """The device's activation is the head's minus the exported centre; clipping comes after, so any two
    releases' clean parts differ by at most 2C: the sensitivity is unchanged."""
    from dpa.contract.devices import DeviceProfile, resolve_device
    from dpa.contract.ort_training import Module
    from runtime_client.head import HeadModel

    _, _, art = recipe
    m = load_manifest(art, verify=("head",))
    assert m.release_centre == "head/release_centre.npy"
    centre = np.load(art / m.release_centre)
    head = HeadModel(art, m, resolve_device(DeviceProfile.CPU))
    raw = Module(str(art / "head" / ARTIFACT_FILES.training), CheckpointState.load_checkpoint(
        str(art / "head" / ARTIFACT_FILES.checkpoint)), str(art / "head" / ARTIFACT_FILES.eval))  # fmt: skip
    raw.eval()
    images = np.random.default_rng(0).standard_normal((4, *m.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(head.forward(images), raw(images) - centre)
    np.testing.assert_array_equal(head.embed(images), raw(images))  # verification's embedding: not centred
    from runtime_client.on_device import pair_embeddings

    paths = list(index_faces(recipe[0] / "pub" / "synthetic-8x6-64px-s1").paths[:3])
    want = raw(load_batch(paths, size=64, mean=m.pixel_mean, std=m.pixel_std)).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(pair_embeddings(head, m, paths), want / np.linalg.norm(want, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-9)  # fmt: skip
    clip = 1.0
    a = head.forward(images)
    clipped = scale_examples(a, clip_factors(l2_norms(a), clip=clip))
    assert l2_norms(clipped).max() <= clip * (1 + 1e-6)
    assert np.linalg.norm((clipped[0] - clipped[1]).ravel()) <= DPConfig(clip=clip).sensitivity * (1 + 1e-6)


def test_frozen_head_releases_once_and_the_device_classifies_with_the_templates(recipe, start_server, tmp_path):
    """Three epochs, one release per example: the accountant counts one, epochs 2 and 3 send the first
    epoch's bytes again, the head is untouched, and the device's accuracy with the server's templates
    is what the server's own templates give on the same clean inputs."""
    _, _, art = recipe
    server = start_server(art, templates=True, checkpoint_every=1000)
    cfg = ClientConfig(
        server=server.url, artifacts=art, epochs=3, batch_size=4, dp=DPConfig(clip=2.0, epsilon=None),
        total_epsilon=50.0, label_epsilon=2.0, frozen_head=True, on_device_templates=True,
        synth=SynthConfig(identities=6, per_identity=8), progress=False, seed=3, state_dir=tmp_path / "client",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = asyncio.run(run_training(cfg))
    total = report["privacy"]["total"]
    z = total["noise_multiplier"]
    assert total["releases"] == 1 and report["privacy"]["releases_per_training_example"] == 1
    assert not any("pretrained weights" in w for w in report["warnings"])  # this export has them
    expected = combined_epsilon(mechanism="gaussian", noise_multiplier=z, label_epsilon=2.0, releases=1, delta=1e-5)
    assert total["epsilon"] == expected <= 50.0
    entries = Journal(server.state.config.state_dir).entries()
    per_epoch = len(entries) // 3
    rows = [Counter() for _ in range(3)]
    for i, entry in enumerate(entries):
        t = Journal.read(entry).tensors
        for act, label in zip(t[GraphNames.ACTIVATION], t[GraphNames.LABELS], strict=True):
            rows[i // per_epoch][act.tobytes() + int(label).to_bytes(8, "little")] += 1
    assert rows[0] == rows[1] == rows[2] and sum(rows[0].values()) == 36
    after = load_head_checkpoint(tmp_path / "client" / HEAD_CHECKPOINT)[0]
    before = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
    assert sorted(after) == sorted(name for name, _ in before.parameters)
    for name, p in before.parameters:
        np.testing.assert_array_equal(np.array(p.data), after[name], err_msg=name)
    # The server's side, computed independently: its templates file, the audit's onnxruntime head.
    server.stop()
    with np.load(server.state.config.state_dir / TEMPLATES_FILE) as z_:
        sums, counts = z_["sums"], z_["counts"]
    assert counts.sum() == 3 * 36  # every epoch's steps reached the templates
    means = sums / np.maximum(counts, 1)[:, None]
    model = TrainedSplitModel(art, tail_checkpoint=server.state.config.state_dir)
    root = tmp_path / "client" / "data" / "synthetic-6x8-64px-s0"
    from dpa.faces.lfw import split_faces

    _, test = split_faces(index_faces(root, min_faces_per_person=2), test_fraction=0.25, seed=0)
    m = load_manifest(art)
    dp = DPConfig(clip=2.0, epsilon=1.0, fixed_noise_multiplier=z)
    a = model.activations(load_batch(list(test.paths), size=64, mean=m.pixel_mean, std=m.pixel_std))
    x = scale_examples(a, clip_factors(l2_norms(a), clip=2.0)) * np.float32(dp.release_scale(m.activation_numel))
    server_side = float((template_scores(x, means, counts).argmax(1) == test.labels).mean())
    assert report["on_device"]["test_accuracy"] == pytest.approx(server_side, abs=1e-12)


def test_a_pretrained_centred_run_beats_a_from_scratch_run_at_the_same_epsilon(recipe, tmp_path):
    """Whole-run epsilon 200, labels in clear, 6 identities: the public recipe (pool5, pretrained, centred,
    frozen, one release, templates on the device) against from-scratch training at conv1_1 (3 epochs)."""
    root, _, art = recipe
    synth = SynthConfig(identities=6, per_identity=40)  # 60 held-out images
    clip = release_clip(load_manifest(art))  # the export centred on its public faces carries it
    common = {"batch_size": 8, "label_epsilon": math.inf, "synth": synth, "progress": False, "seed": 0,
              "total_epsilon": 200.0}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        public = asyncio.run(serve_and_train(art, tmp_path / "s1", ClientConfig(
            artifacts=art, epochs=1, dp=DPConfig(clip=clip, epsilon=None), frozen_head=True,
            on_device_templates=True, state_dir=tmp_path / "c1", **common), templates=True))  # fmt: skip
        scratch_art = tmp_path / "scratch"
        export(ExportConfig(arch=ARCH, cut="conv1_1", optimizer=OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3),
                            out=scratch_art))  # fmt: skip
        scratch = asyncio.run(serve_and_train(scratch_art, tmp_path / "s2", ClientConfig(
            artifacts=scratch_art, epochs=3, dp=DPConfig(clip=100.0, epsilon=None), state_dir=tmp_path / "c2",
            **common)))  # fmt: skip
    ours = public["on_device"]["test_accuracy"]
    theirs = max(scratch["clean_test_accuracy"], scratch["private_test_accuracy"])
    print(f"\nclip {clip:.3g}; public recipe {ours:.3f} vs from scratch {theirs:.3f} (chance {1 / 6:.3f}), epsilon 200")
    assert ours > theirs + 0.05 and ours > 1 / 6 + 0.05


def test_the_export_carries_the_public_clip_the_device_defaults_to(recipe):
    """The exporter's release_clip is half the median norm of the centred activations on the public faces,
    recomputed here with the device's own head (onnxruntime); `dpa client` without --clip uses it."""
    from dpa.cli.device_options import DeviceOptions, _clip
    from dpa.contract.devices import DeviceProfile, resolve_device
    from runtime_client.head import HeadModel

    root, _, art = recipe
    m = load_manifest(art, verify=("head",))
    index = index_faces(root / "pub" / "synthetic-8x6-64px-s1", min_faces_per_person=1)
    images = load_batch(list(index.paths), size=m.image_size, mean=m.pixel_mean, std=m.pixel_std)
    norms = l2_norms(HeadModel(art, m, resolve_device(DeviceProfile.CPU)).forward(images))
    assert m.release_clip == pytest.approx(0.5 * float(np.median(norms)), rel=1e-4)
    assert _clip(DeviceOptions(artifacts=art)) == m.release_clip
    assert _clip(DeviceOptions(artifacts=art, clip=3.0)) == 3.0
    with pytest.raises(UserError, match="no manifest.json"):  # no export: said, not a default clip
        _clip(DeviceOptions(artifacts=root / "no-export"))


def _train_test(client_dir, art):  # type: ignore[no-untyped-def]
    from dpa.faces.lfw import split_faces

    root = next((client_dir / "data").iterdir())
    return split_faces(index_faces(root, min_faces_per_person=2), test_fraction=0.25, seed=0)


def test_a_class_sum_release_is_one_request_and_the_device_classifies_with_it(recipe, start_server, tmp_path):
    """`--release class-sums`: one request of noisy class sums at the whole run's epsilon (nothing else is
    sent: no step), accounted as one Gaussian release with the labels inside; the noise on it is the
    calibrated one; the device's accuracy is the server's templates applied to its clean inputs,
    recomputed here from the server's own file with the audit's head; and a resumed device re-sends
    the same bytes, which the server keeps once."""
    from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
    from dpa.privacy.class_sums import contributions
    from runtime_server.class_sums import CLASS_SUMS_DIR

    root, _, art = recipe
    clip = release_clip(load_manifest(art))  # the export centred on its public faces carries it
    server = start_server(art, checkpoint_every=1000)
    cfg = ClientConfig(
        server=server.url, artifacts=art, dp=DPConfig(clip=clip, epsilon=None), total_epsilon=8.0, frozen_head=True,
        on_device_templates=True, release="class-sums", synth=SynthConfig(identities=6, per_identity=20),
        progress=False, seed=4, state_dir=tmp_path / "client", record_view=tmp_path / "view",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = asyncio.run(run_training(cfg))
    p = report["privacy"]
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1)
    assert p["noise_multiplier"] == z and p["noise_scale"] == 2 * z * clip
    assert p["total"]["epsilon"] == epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=1, delta=1e-5)
    assert p["total"]["epsilon"] <= 8.0 and p["total"]["releases"] == 1 and "labels" in p["total"]["covers"]
    assert report["warnings"] == ["fixed --seed: noise is reproducible (experiments only)"]  # no "labels in clear"
    assert server.state.tail.global_step == 0 and not Journal(server.state.config.state_dir).entries()
    files = list((server.state.config.state_dir / CLASS_SUMS_DIR).glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as f:
        sums, counts = f["sums"].astype(np.float64), f["counts"].astype(np.float64)
    assert (tmp_path / "view" / "class_sums.wire").read_bytes() == (
        tmp_path / "client" / "class_sums.wire"
    ).read_bytes()
    # The noise, against the exact sums of the clean, clipped training activations (audit head, torch).
    train, test = _train_test(tmp_path / "client", art)
    m = load_manifest(art)
    model = TrainedSplitModel(art, tail_checkpoint=art / "tail" / ARTIFACT_FILES.checkpoint)  # no step: as exported

    def clipped(index):  # type: ignore[no-untyped-def]
        a = model.activations(load_batch(list(index.paths), size=64, mean=m.pixel_mean, std=m.pixel_std))
        return scale_examples(a, clip_factors(l2_norms(a), clip=clip))

    exact = contributions(clipped(train), train.labels.astype(np.int64), m.num_classes, clip)
    noise = np.concatenate([(sums.reshape(len(sums), -1) - exact[:, :-1]).ravel(), counts * clip - exact[:, -1]])
    assert np.std(noise) == pytest.approx(2 * z * clip, rel=0.1)  # 6 x 513 draws
    # The device's figure, recomputed from the server's file (rounded counts, floored at 0).
    n = np.maximum(np.rint(counts), 0)
    means = np.where(n[:, None] > 0, sums.reshape(len(sums), -1) / np.maximum(n, 1)[:, None], 0.0)
    server_side = float((template_scores(clipped(test), means, n).argmax(1) == test.labels).mean())
    assert report["on_device"]["test_accuracy"] == pytest.approx(server_side, abs=1e-12)
    # Resumed: the kept release is re-sent as it was (its session is closed: a new one), kept once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = asyncio.run(run_training(replace(cfg, resume=True)))
    assert again["resilience"]["kept_release_resent"] is True
    assert len(list((server.state.config.state_dir / CLASS_SUMS_DIR).glob("*.npz"))) == 1
    assert again["on_device"]["test_accuracy"] == report["on_device"]["test_accuracy"]
