"""The public weights the repository ships (issue 23): checked against their sidecar, loadable, and what
the sidecar says they are (trained on public identities only, validated on held-out public pairs)."""

from __future__ import annotations

import shutil

import pytest

from dpa.contract.architecture import ArchConfig
from dpa.contract.errors import UserError
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS, reproduce_chain, shipped_info, shipped_weights
from exporter.pretrain import PUBLIC_SEED, VALIDATION_SEED
from exporter.vggface import build_parts, load_weights


def test_the_shipped_file_matches_its_sidecar_and_loads():
    info = shipped_info()
    assert info["command"].startswith("dpa pretrain ") and "--no-classifier" in info["command"]
    assert info["public_seed"] == PUBLIC_SEED != 0 and info["validation"]["seed"] == VALIDATION_SEED != 0
    assert info["precision"] == "float32" and len(info["identities"]) >= 500
    assert info["history"][-1]["val_auc"] > 0.9  # verification on held-out public pairs, as recorded
    assert shipped_weights(64, 0.25) == SHIPPED_WEIGHTS and shipped_weights(64, 0.5) is None
    head, tail = build_parts(ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0), "fc7")
    load_weights((head, tail), SHIPPED_WEIGHTS)  # embedding-only: fc8 is initialised for the device's classes


def test_the_retraining_chain_starts_from_nothing_and_names_the_repository_paths():
    """The shipped file was trained from earlier weights (--init): the chain that retrains it runs their
    command first, into runs/public-stage1.pt, then this file's command from there, into weights/."""
    info = shipped_info()
    chain = reproduce_chain(info).split(" && ")
    assert info["init"]["sha256"] and info["init"]["command"].startswith("dpa pretrain ")
    assert len(chain) == 2 and all(c.startswith("dpa pretrain ") for c in chain)
    assert "--out runs/public-stage1.pt" in chain[0] and "--init" not in chain[0]
    assert "--init runs/public-stage1.pt" in chain[1]
    assert "--out weights/public-vggface-64px-w0.25.pt" in chain[1]
    assert f"--identities {len(info['identities'])}" in chain[1] and "--loss cosface" in chain[1]


def test_a_changed_copy_is_refused_naming_it(tmp_path):
    copy = tmp_path / SHIPPED_WEIGHTS.name
    shutil.copy(SHIPPED_WEIGHTS, copy)
    shutil.copy(str(SHIPPED_WEIGHTS) + ".json", str(copy) + ".json")
    assert shipped_info(copy)["sha256"] == shipped_info()["sha256"]
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"does not match its sidecar .*retrain it with: dpa pretrain"):
        shipped_info(copy)
