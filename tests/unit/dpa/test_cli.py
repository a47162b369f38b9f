"""CLI surfaces not covered elsewhere: data synth, help, parameter validation."""

from __future__ import annotations

from typer.testing import CliRunner

from dpa.app import app
from runtime_client.faces import index_faces

runner = CliRunner()


def test_data_synth_writes_lfw_layout(tmp_path):
    out = tmp_path / "faces"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--identities", "3", "--per-identity", "4"])
    assert result.exit_code == 0, result.output
    index = index_faces(out)
    assert len(index.names) == 3 and len(index.paths) == 12
    assert all(p.name.startswith(p.parent.name + "_000") and p.suffix == ".jpg" for p in index.paths)
    again = runner.invoke(app, ["data", "synth", "--out", str(out)])
    assert again.exit_code == 2 and "is not empty" in again.output


def test_bad_client_parameters_fail_before_any_work(tmp_path):
    result = runner.invoke(app, ["client", "--epsilon", "0", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "epsilon must be > 0" in result.output
    result = runner.invoke(app, ["client", "--mechanism", "exponential", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "unknown mechanism 'exponential'" in result.output
    result = runner.invoke(app, ["client", "--artifacts", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    result = runner.invoke(app, ["serve", "--artifacts", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    for command in ("export", "serve", "client", "eval", "demo", "data"):
        assert command in result.output
