"""The ``dpa`` command line: every subcommand registered in one place.

Subcommands import their heavy dependencies inside the function, so ``dpa client``
and ``dpa serve`` never import torch (only ``dpa export`` does).
"""

from __future__ import annotations

import typer

from dpa.cli.attack import attack_app
from dpa.cli.bench import bench_command
from dpa.cli.client import client_command, eval_command
from dpa.cli.data import data_app
from dpa.cli.demo import demo_command
from dpa.cli.evaluate import evaluate_app
from dpa.cli.export import export_command
from dpa.cli.faces import faces_app
from dpa.cli.federate import federate_command
from dpa.cli.pretrain import pretrain_command
from dpa.cli.privacy import privacy_command
from dpa.cli.recognize import recognize_command, verify_command
from dpa.cli.serve import serve_command, token_app
from dpa.cli.sweep import sweep_command
from dpa.cli.web_device import web_device_command

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a traceback must never print tensors, labels or tokens
    add_completion=False,
    help="Private split training of VGG-Face between a device and an untrusted edge server (DP-A).",
)


@app.callback()
def _root() -> None:
    """Private split training of VGG-Face between a device and an untrusted edge server (DP-A)."""


app.command("pretrain")(pretrain_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("client")(client_command)
app.command("eval")(eval_command)
app.command("demo")(demo_command)
app.command("privacy")(privacy_command)
app.command("sweep")(sweep_command)
app.command("bench")(bench_command)
app.command("recognize")(recognize_command)
app.command("verify")(verify_command)
app.command("web-device")(web_device_command)
app.command("federate")(federate_command)
app.add_typer(data_app, name="data")
app.add_typer(attack_app, name="attack")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(faces_app, name="faces")
app.add_typer(token_app, name="token")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
