"""The one clip policy: an override wins, else the export's public clip, else a clear refusal; the public
clip is half the median of public norms (numpy's median, computed independently here)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.privacy.release_clip import NO_CLIP, SHARE_OF_PUBLIC_MEDIAN, public_clip_from_norms, release_clip


def test_the_public_clip_is_half_the_median_of_the_public_norms():
    norms = np.array([4.0, 1.0, 3.0, 2.0], dtype=np.float32)
    assert SHARE_OF_PUBLIC_MEDIAN == 0.5
    assert public_clip_from_norms(norms) == 0.5 * 2.5  # the mean of the two middle ones
    with pytest.raises(UserError, match="no public activations"):
        public_clip_from_norms(np.array([]))


def test_override_then_manifest_then_refusal(small_export):
    m = load_manifest(small_export)
    assert m.release_clip is None  # exported without public faces
    assert release_clip(m, 3.5) == 3.5
    with pytest.raises(UserError, match="clip must be > 0"):
        release_clip(m, -1.0)
    with pytest.raises(UserError, match=re.escape(f"{small_export} {NO_CLIP}")):
        release_clip(m, source=small_export)
    assert release_clip(replace(m, release_clip=0.25)) == 0.25
    with pytest.raises(UserError, match="the export carries no public release clip"):
        release_clip(None)


def test_no_clip_literal_is_left_outside_the_policy():
    """The issue's check: grep finds no 10.0 clip default in the product (the policy is the one owner)."""
    out = subprocess.run(
        ["git", "grep", "-nE", r"clip[^=\n]*= *10(\.0)?\b|FALLBACK_CLIP", "--", "dpa", "runtime_client",
         "runtime_server", "runtime_web/static", "exporter"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout == "", out.stdout


def test_the_page_takes_its_clip_from_the_manifest_and_refuses_without_one():
    js = (Path(__file__).parents[3] / "runtime_web" / "static" / "device.js").read_text()
    assert "state.manifest.release_clip" in js
    assert "the export carries no public release clip: give the clip C, or export with --centre-faces" in js
