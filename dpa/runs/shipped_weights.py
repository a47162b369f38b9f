"""The public weights the repository ships: trained by ``dpa pretrain`` on public faces, too costly for
a fresh machine's demo to train, loaded only after their sidecar and hash check out.

Issue 23: face recognition lives on embeddings trained on many public identities, and pretraining at
that scale takes tens of minutes on 2 cores, where the demo has three. So ``weights/`` holds the file
``dpa pretrain`` wrote (without its public classifier) and its sidecar JSON: the exact command, the
config, the public data seed, the training history with its validation on held-out public identities,
and the file's SHA-256. A file whose bytes do not match its sidecar is refused, naming both.
Identical weights on every machine also keep the demo's figures from depending on the CPU (issue 22).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dpa.contract.errors import UserError
from dpa.contract.manifest import sha256_file

__all__ = ["SHIPPED_WEIGHTS", "reproduce_chain", "shipped_weights", "shipped_info"]

#: The shipped file (64x64 input, width 0.25); its sidecar is the same path plus ``.json``.
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "public-vggface-64px-w0.25.pt"


def shipped_info(path: Path = SHIPPED_WEIGHTS) -> dict[str, Any]:
    """The sidecar of a shipped file, after checking the file's SHA-256 against it."""
    meta = Path(str(path) + ".json")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the shipped weights' sidecar {meta} is unreadable ({exc})") from None
    digest = sha256_file(path)
    if digest != info.get("sha256"):
        raise UserError(
            f"{path} does not match its sidecar {meta.name} (SHA-256 {digest[:12]}..., the sidecar says "
            f"{str(info.get('sha256'))[:12]}...): restore it with git, or retrain it with: {reproduce_chain(info)}"
        )
    return info


def reproduce_chain(info: dict[str, Any], out: str = "weights/public-vggface-64px-w0.25.pt") -> str:
    """The commands that retrain a file from nothing, with the repository's paths: a file trained from
    earlier weights (``dpa pretrain --init``) names, in its sidecar, the command that made those; that
    one runs first, writing ``runs/public-stage1.pt``, then this file's own command starts from it. The
    sidecar's commands keep the paths the runs actually used."""
    command = re.sub(r"--out \S+", f"--out {out}", str(info.get("command")))
    init = info.get("init")
    if not init:
        return command
    stage1 = "runs/public-stage1.pt"
    first = re.sub(r"--out \S+", f"--out {stage1}", str(init.get("command")))
    second = re.sub(r"--init \S+", f"--init {stage1}", command)
    return f"{first} && {second}"


def shipped_weights(image_size: int, width: float, path: Path = SHIPPED_WEIGHTS) -> Path | None:
    """The shipped file if it exists and was trained for this input size and width, else None."""
    if not path.is_file():
        return None
    config = shipped_info(path)["config"]
    if (int(config["image_size"]), float(config["width"])) != (image_size, width):
        return None
    return path
