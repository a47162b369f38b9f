"""CLI surfaces not covered elsewhere: data synth, help, parameter validation."""

from __future__ import annotations

from typer.testing import CliRunner

from dpa.cli.app import app
from dpa.faces.lfw import index_faces

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


def _flat(output: str) -> str:
    """typer's error box as one line of text."""
    return " ".join(output.replace("│", " ").split())


def test_bad_client_parameters_fail_before_any_work(tmp_path):
    result = runner.invoke(app, ["client", "--epsilon", "0", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "epsilon must be > 0" in result.output
    # Enum options go through typer's own Enum support: an unknown name is refused listing the valid ones...
    result = runner.invoke(app, ["client", "--mechanism", "exponential", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "'exponential' is not one of 'gaussian', 'laplace'" in _flat(result.output)
    result = runner.invoke(app, ["client", "--wire-dtype", "float8", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "'float8' is not one of 'float32', 'float16'" in _flat(result.output)
    # ... and names are matched in any case (the run then stops at the missing export, not at the option).
    result = runner.invoke(app, ["client", "--mechanism", "LAPLACE", "--artifacts", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    result = runner.invoke(app, ["client", "--artifacts", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    result = runner.invoke(app, ["serve", "--artifacts", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no manifest.json" in result.output
    assert not (tmp_path / "none").exists()  # no token file (or folder) was created for it


def test_serve_refuses_an_exposed_bind_without_auth_or_tls(tmp_path):
    result = runner.invoke(app, ["serve", "--artifacts", str(tmp_path), "--host", "0.0.0.0", "--no-auth"])
    assert result.exit_code == 2 and "without auth or TLS" in result.output and "--insecure" in result.output
    result = runner.invoke(app, ["serve", "--artifacts", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without TLS exposes" in result.output
    result = runner.invoke(app, ["serve", "--artifacts", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")])
    assert result.exit_code == 2 and "TLS needs both --tls-cert and --tls-key" in result.output
    assert list(tmp_path.iterdir()) == []


def test_token_add_writes_the_server_file_and_the_device_copy(tmp_path):
    from runtime_client.edge import read_token_file
    from runtime_server.auth import TokenStore

    server_file, device_file = tmp_path / "state" / "tokens.txt", tmp_path / "phone.token"
    result = runner.invoke(app, ["token", "add", "phone-1", "--tokens", str(server_file), "--out", str(device_file)])
    assert result.exit_code == 0, result.output
    token = read_token_file(device_file)
    assert token not in result.output  # written to the device's file, not shown
    assert TokenStore.load(server_file).authenticate(f"Bearer {token}") == "phone-1"
    assert oct(device_file.stat().st_mode & 0o777) == "0o600"
    result = runner.invoke(app, ["token", "add", "phone-1", "--tokens", str(server_file)])
    assert result.exit_code == 2 and "already has a token for 'phone-1'" in result.output
    result = runner.invoke(app, ["token", "add", "phone-2", "--tokens", str(server_file)])
    assert (
        result.exit_code == 0
        and TokenStore.load(server_file).authenticate("Bearer " + result.output.strip().splitlines()[-1]) == "phone-2"
    )  # without --out the token is printed, last line, for piping


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    for command in ("export", "serve", "client", "eval", "demo", "data"):
        assert command in result.output
