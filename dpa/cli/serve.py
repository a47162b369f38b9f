"""``dpa serve`` (the edge server for the tail) and ``dpa token add`` (device tokens)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from dpa.cli.errors import console, user_errors
from dpa.contract.devices import DeviceProfile
from runtime_server.logs import LogFormat, configure
from runtime_server.templates import MAX_TEMPLATE_BYTES

token_app = typer.Typer(help="Device tokens for the edge server.", no_args_is_help=True)

TokensOpt = Annotated[
    Path | None,
    typer.Option(help="Token file ('name token' per line). Default <state-dir>/tokens.txt, created if missing."),
]


# serve_command's longer options, named here so that the command reads as its signature and its body.
_Device = Annotated[
    DeviceProfile,
    typer.Option(help="auto, cpu, arm64 or cuda (falls back to cpu, saying why).", case_sensitive=False),
]
_CheckpointEvery = Annotated[
    int, typer.Option(help="Train steps between full tail checkpoints (the journal covers the steps between).")
]
_NoJournal = Annotated[
    bool, typer.Option("--no-journal", help="No per-step journal: a crash loses the steps since the checkpoint.")
]
_Templates = Annotated[
    bool | None,
    typer.Option(
        "--templates/--no-templates",
        help="Keep class templates (mean release per label) and serve them at GET /v1/templates; default: "
        f"whenever they fit in {MAX_TEMPLATE_BYTES >> 30} GiB (classes x activation elements x 8 bytes).",
        show_default=False,
    ),
]
_StateDir = Annotated[
    Path | None,
    typer.Option(help="Checkpoint, session table and replies (default <artifacts>/server-state)."),
]
_Insecure = Annotated[
    bool, typer.Option("--insecure", help="Allow a non-loopback bind without auth or TLS (trusted network).")
]
_TransferBaseS = Annotated[
    float, typer.Option(help="Seconds any body or reply may take, plus its bytes at --min-transfer-kib-s.")
]
_MinTransferKibS = Annotated[
    float, typer.Option(help="Slowest upload or download accepted (KiB/s); slower ones get 408 / are dropped.")
]
_MaxInflightBodyMb = Annotated[
    float | None, typer.Option(help="MiB of request bodies held at once (default: 4 full-batch bodies).")
]
_MinFreeMb = Annotated[
    float, typer.Option(help="Free space (MiB) the state dir keeps: below it steps are refused, not half-written.")
]
_LogFormat = Annotated[LogFormat, typer.Option(help="json (one object per line) or text.", case_sensitive=False)]
_GallerySize = Annotated[
    int | None,
    typer.Option(help="Class-sum gallery rows, when devices name theirs (a federation's edge server)."),
]
_Operator = Annotated[
    list[str] | None,
    typer.Option(help="A token name that may read and replace the tail (a federation's bridge)."),
]
_AllowOrigin = Annotated[
    list[str] | None,
    typer.Option(
        help="A browser device's page origin (dpa web-device prints it) allowed to call the API "
        "(CORS); repeat for several. None by default."
    ),
]


def serve_command(
    artifacts: Annotated[Path, typer.Option(help="Export folder (manifest.json + tail/).")] = Path("artifacts"),
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8080,
    device: _Device = DeviceProfile.AUTO,
    max_batch: Annotated[int, typer.Option(help="Largest batch per request; sets the body-size limit.")] = 32,
    checkpoint_every: _CheckpointEvery = 20,
    no_journal: _NoJournal = False,
    templates: _Templates = None,
    state_dir: _StateDir = None,
    tokens: TokensOpt = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Accept requests without a token (loopback).")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    insecure: _Insecure = False,
    max_sessions: Annotated[int, typer.Option(help="Open sessions at once.")] = 64,
    max_sessions_per_device: Annotated[int, typer.Option(help="Open sessions per device token.")] = 4,
    session_idle_s: Annotated[float, typer.Option(help="Close a session after this many idle seconds.")] = 3600.0,
    session_rate: Annotated[float, typer.Option(help="Requests per second per session, sustained.")] = 20.0,
    session_burst: Annotated[int, typer.Option(help="Requests per session in a burst.")] = 40,
    transfer_base_s: _TransferBaseS = 30.0,
    min_transfer_kib_s: _MinTransferKibS = 256.0,
    max_inflight_body_mb: _MaxInflightBodyMb = None,
    min_free_mb: _MinFreeMb = 16.0,
    log_format: _LogFormat = LogFormat.JSON,
    allow_origin: _AllowOrigin = None,
    gallery_size: _GallerySize = None,
    operator: _Operator = None,
) -> None:
    """Serve the tail: train it on DP activations from devices, return activation gradients."""
    from aiohttp import web

    from dpa.contract.manifest import load_manifest
    from runtime_server.app import init_app
    from runtime_server.auth import add_token
    from runtime_server.config import ServerConfig
    from runtime_server.tls import server_ssl_context

    with user_errors():
        configure(log_format, logging.INFO)
        resolved_state = state_dir if state_dir is not None else artifacts / "server-state"
        token_file = None if no_auth else (tokens if tokens is not None else resolved_state / "tokens.txt")
        config = ServerConfig(
            artifacts=artifacts, host=host, port=port, device=device, max_batch=max_batch,
            checkpoint_every=checkpoint_every, journal=not no_journal, templates=templates, state_dir=state_dir,
            tokens=token_file, tls_cert=tls_cert, tls_key=tls_key, insecure=insecure, max_sessions=max_sessions,
            max_sessions_per_device=max_sessions_per_device, session_idle_s=session_idle_s,
            session_rate=session_rate, session_burst=session_burst, min_free_bytes=int(min_free_mb * 2**20),
            transfer_base_s=transfer_base_s, min_transfer_rate=min_transfer_kib_s * 2**10,
            max_inflight_body_bytes=None if max_inflight_body_mb is None else int(max_inflight_body_mb * 2**20),
            allow_origins=tuple(allow_origin or ()), gallery_size=gallery_size, operators=tuple(operator or ()),
        )  # fmt: skip
        ssl_context = server_ssl_context(config)
        load_manifest(artifacts)  # a wrong --artifacts fails here, before a token file is created
        if token_file is not None and not token_file.exists():
            add_token(token_file, "device-1")
            console.print(
                f"created token file {token_file} with a token for device-1; on the device: "
                f"[bold]dpa client --token-file {token_file}[/] (or `dpa token add` for one file per device)"
            )
        app = init_app(config)
    auth = "no auth" if token_file is None else f"tokens from {token_file}"
    console.print(
        f"dpa edge server for {artifacts}/ on {config.scheme}://{host}:{port} ({auth}; Ctrl-C saves and stops)"
    )
    with user_errors():  # a state dir that fails its checks at start (corrupt, foreign) is the user's to fix
        web.run_app(app, host=host, port=port, print=None, access_log=None, ssl_context=ssl_context)


@token_app.command("add")
def token_add_command(
    name: Annotated[str, typer.Argument(help="Device name (letters, digits, . _ -): shown in logs and metrics.")],
    tokens: Annotated[Path, typer.Option(help="The server's token file (created if missing).")] = Path(
        "artifacts/server-state/tokens.txt"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Also write the token alone to this file, for the device's --token-file.")
    ] = None,
) -> None:
    """Add a device token to the server's token file (`kill -HUP` the server, or restart it, to load it)."""
    from dpa.base.atomic import atomic_write_bytes
    from runtime_server.auth import add_token

    with user_errors():
        token = add_token(tokens, name)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, (token + "\n").encode())  # mkstemp: mode 0600
    console.print(f"added a token for {name} to {tokens}" + (f"; the device's copy is {out}" if out else ""))
    if out is None:
        print(token)
