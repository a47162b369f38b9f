"""``dpa privacy``: both directions, JSON consistent with the library, clean usage errors."""

from __future__ import annotations

import json
import math

import pytest
import typer
from typer.testing import CliRunner

from dpa.cli.privacy import privacy_command
from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent

runner = CliRunner()
app = typer.Typer()
app.command("privacy")(privacy_command)


@app.callback()
def _root() -> None:
    """A local app, so that these tests do not depend on dpa.cli.app's registration."""


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["privacy", *args])


def test_epsilon_for_a_noise_multiplier_json():
    result = invoke("--noise-multiplier", "1", "--releases", "10", "--delta", "1e-5", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["epsilon", "delta", "noise_multiplier", "releases", "mechanism", "accountant",
                         "information_bound_nats"]  # fmt: skip
    assert out["epsilon"] == epsilon_spent(mechanism="gaussian", noise_multiplier=1.0, releases=10, delta=1e-5)
    assert out["epsilon"] == pytest.approx(17.8566, rel=1e-4)
    assert out | {"epsilon": 0} == {
        "epsilon": 0,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "releases": 10,
        "mechanism": "gaussian",
        "accountant": "pld",
        "information_bound_nats": 10 / 8,  # the Gaussian channel's capacity: releases / (8 z^2), z = 1
    }


def test_noise_multiplier_for_an_epsilon_json():
    result = invoke("--epsilon", "8", "--releases", "10", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    nm = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=10)
    assert out["noise_multiplier"] == nm
    assert out["epsilon"] == epsilon_spent(mechanism="gaussian", noise_multiplier=nm, releases=10, delta=1e-5) <= 8.0
    assert out["delta"] == 1e-5 and out["releases"] == 10 and out["accountant"] == "pld"


def test_laplace_pure_dp_json():
    result = invoke("--epsilon", "8", "--releases", "10", "--delta", "0", "--mechanism", "Laplace", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mechanism"] == "laplace" and out["delta"] == 0.0
    assert out["noise_multiplier"] == pytest.approx(math.sqrt(2) * 10 / 8, rel=1e-12)
    assert out["epsilon"] <= 8.0


def test_human_output_names_the_noise_scale():
    result = invoke("--noise-multiplier", "1.5", "--releases", "4", "--clip", "2")
    assert result.exit_code == 0, result.output
    assert "sigma = 6 for clip C = 2" in result.output and "epsilon =" in result.output
    result = invoke("--epsilon", "8", "--releases", "10", "--delta", "0", "--mechanism", "laplace", "--clip", "2")
    assert result.exit_code == 0, result.output
    assert "noise multiplier >= 1.76777" in result.output and "b = 5 for clip C = 2" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("--releases", "10"),
        ("--releases", "10", "--epsilon", "1", "--noise-multiplier", "1"),
    ],
)
def test_exactly_one_of_noise_multiplier_and_epsilon(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "exactly one of --noise-multiplier" in result.output and "--epsilon" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--epsilon", "0", "--releases", "3"), "epsilon must be > 0"),
        (("--epsilon", "nan", "--releases", "3"), "epsilon must be > 0"),
        (("--noise-multiplier", "-1", "--releases", "3"), "noise multiplier must be > 0"),
        (("--epsilon", "1", "--releases", "3", "--delta", "1"), "delta must be in [0, 1)"),
        (("--epsilon", "1", "--releases", "-1"), "releases must be >= 0"),
        (("--epsilon", "1", "--releases", "3", "--clip", "0"), "clip must be > 0"),
        (("--epsilon", "1", "--releases", "0"), "releases must be >= 1"),
        (("--noise-multiplier", "1", "--releases", "3", "--delta", "0"), "delta must be in (0, 1) for the gaussian"),
        (
            ("--noise-multiplier", "1", "--releases", "3", "--mechanism", "foo"),
            "'foo' is not one of 'gaussian', 'laplace'",
        ),
    ],
)
def test_bad_parameters_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())  # unwrap rich's error panel


def test_zero_releases_cost_nothing():
    result = invoke("--noise-multiplier", "1", "--releases", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epsilon"] == 0.0
