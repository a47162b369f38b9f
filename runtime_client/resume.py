"""A device run's progress, saved with the head after every step, and re-attaching to its server session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpa.contract.errors import UserError
from dpa.contract.messages import TrainReply
from runtime_client.edge import EdgeClient, EdgeError

__all__ = ["RunProgress", "attach_session"]


@dataclass
class RunProgress:
    """Where the run is, saved with the head after every step (checkpoint properties).

    A device killed mid-epoch resumes at the next batch of the same epoch, in the same
    session, with the same noise generator state: nothing is released twice.
    """

    epochs_done: int = 0
    epoch_step: int = 0  # batches of the current epoch whose updates the head holds
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    session_id: str = ""
    session_step: int = 0

    _INT = ("epochs_done", "epoch_step", "correct", "seen", "session_step")

    @classmethod
    def load(cls, props: Any) -> RunProgress:
        out = cls()
        for key in (*cls._INT, "loss_sum", "session_id"):
            if f"run.{key}" in props:
                kind = int if key in cls._INT else float if key == "loss_sum" else str
                setattr(out, key, kind(props[f"run.{key}"]))
        if "epochs_done" in props and "run.epochs_done" not in props:  # checkpoints of older versions
            out.epochs_done = int(props["epochs_done"])
        return out

    def store(self, props: Any) -> None:
        for key in (*self._INT, "loss_sum", "session_id"):
            props[f"run.{key}"] = getattr(self, key)
        props["epochs_done"] = self.epochs_done


async def attach_session(
    edge: EdgeClient, digest: str, progress: RunProgress, say: Any, labels: dict[str, object] | None = None
) -> tuple[str, int, TrainReply | None]:
    """The session to train in: (id, last applied step, stored reply to replay or None).

    A resumed device asks the server where its session stands. The server may be one step
    ahead (the device died after the server applied a step, before the device saved): the
    device then fetches that step's stored reply instead of sending the batch again.
    """
    if progress.session_id:
        try:
            info = await edge.describe_session(progress.session_id)
        except EdgeError as exc:
            if exc.status not in (404, 410):
                raise
            say(f"[yellow]the server no longer has session {progress.session_id[:8]}... ({exc.code}): opening another")
        else:
            server_step, mine = int(info["step"]), progress.session_step
            if server_step == mine:
                return progress.session_id, mine, None
            if server_step == mine + 1:
                return progress.session_id, mine, await edge.stored_reply(progress.session_id, server_step)
            if server_step < mine:
                say(f"[yellow]the server lost steps {server_step + 1}..{mine} (it rolled back to its last checkpoint)")
                return progress.session_id, server_step, None
            raise UserError(
                f"session {progress.session_id[:8]}... is at step {server_step} on the server but this device saved "
                f"step {mine}: another device uses it, or the head checkpoint is older than the run"
            )
    session = await edge.open_session(digest, client="dpa-client", labels=labels)
    return session.session_id, session.step, None
