"""The ClientApp on an edge server's SuperNode: the bridge between Flower and its own ``dpa serve``.

It runs on the edge server's machine and answers the ServerApp with what the recipe combines, never
with a device's release:

- class sums (``query`` "class-sums"): it reads the edge server's class-sum store from its state folder,
  as the server itself rebuilds it at start (``runtime_server.class_sums``: one file per session, each
  written whole before its device was answered, so a reader sees whole releases only), and answers the
  sums and noisy counts of the gallery rows its devices hold, summed over its devices, with the SHA-256
  of every release in them (so that the ServerApp can see that no release is counted at two edge servers);
- SplitFed (``train``): it reads the tail its edge server trained on its devices' per-example releases
  (``GET /v1/tail``, an operator token) and answers it with the examples it was trained on since its last
  load: FedAvg's weight. The average comes back (``query`` "load-tail") and it loads it into the edge
  server (``PUT /v1/tail``, against the step it was read at; ``409 tail_moved`` if devices trained since).

Everything it answers is a function of what its edge server already holds; asking again gives the same
answer, so a round retried after a crash counts nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.manifest import load_manifest
from dpa.federation.deployment.keys import ANSWERING, CLASS_SUMS, LOAD_TAIL, READ_TAIL, TAIL_LOADS, Do, Node
from runtime_client.edge import EdgeClient, read_token_file
from runtime_server.class_sums import ClassSumStore

__all__ = ["bridge_app", "app"]


def _node(context: Context, key: str, default: object = None) -> object:
    value = context.node_config.get(key, default)
    if value is None:
        raise ValueError(f"this SuperNode has no --node-config {key}=...: the bridge needs it")
    return value


def _edge(context: Context) -> EdgeClient:
    ca = str(_node(context, Node.EDGE_CA, ""))
    token = read_token_file(Path(str(_node(context, Node.OPERATOR_TOKEN))))
    return EdgeClient(str(_node(context, Node.EDGE_URL)), token=token, ca=Path(ca) if ca else None)


def _drill(context: Context, what: str) -> None:
    """Fault drills: say that an answer is under way, then wait (a test kills the SuperNode meanwhile)."""
    pause = float(_node(context, Node.DRILL_PAUSE_S, 0.0))  # type: ignore[arg-type]
    if pause > 0 and str(_node(context, Node.DRILL_AT, "")) in ("", what):
        folder = Path(str(_node(context, Node.BRIDGE_STATE)))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{ANSWERING}.{what}", b"")
        time.sleep(pause)


def _class_sums(context: Context, msg: Message) -> RecordDict:
    artifacts = Path(str(_node(context, Node.ARTIFACTS)))
    size = int(msg.content[Do.RECORD][Do.GALLERY_SIZE])
    store = ClassSumStore(Path(str(_node(context, Node.EDGE_STATE))), size, load_manifest(artifacts).activation_numel)
    rows = np.flatnonzero(store.held)
    _drill(context, CLASS_SUMS)
    return RecordDict({
        "sums": ArrayRecord({"rows": Array(rows.astype(np.int64)), "sums": Array(store.sums[rows]),
                             "counts": Array(store.counts[rows])}),
        "edge": ConfigRecord({"edge": int(_node(context, Node.EDGE_ID)), "releases": len(store),  # type: ignore[arg-type]
                              "digests": store.digests}),
    })  # fmt: skip


def _loads(context: Context) -> tuple[Path, dict[str, int]]:
    path = Path(str(_node(context, Node.BRIDGE_STATE))) / TAIL_LOADS
    return path, (json.loads(path.read_text()) if path.is_file() else {"examples_at_load": 0})


def _read_tail(context: Context) -> RecordDict:
    async def read() -> tuple[dict[str, np.ndarray], dict]:  # type: ignore[type-arg]
        async with _edge(context) as edge:
            return await edge.tail()

    params, meta = asyncio.run(read())
    _drill(context, READ_TAIL)
    _, loads = _loads(context)
    examples = int(meta["examples_seen"]) - int(loads["examples_at_load"])
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()}),
        "metrics": MetricRecord({"num-examples": examples}),
        "edge": ConfigRecord({"edge": int(_node(context, Node.EDGE_ID)), "global-step": int(meta["global_step"]),  # type: ignore[arg-type]
                              "examples-seen": int(meta["examples_seen"])}),
    })  # fmt: skip


def _load_tail(context: Context, msg: Message) -> RecordDict:
    params = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    _drill(context, LOAD_TAIL)
    step = int(list(msg.content[Do.RECORD][Do.GLOBAL_STEPS])[int(_node(context, Node.EDGE_ID))])  # type: ignore[call-overload]

    async def load() -> dict:  # type: ignore[type-arg]
        async with _edge(context) as edge:
            return await edge.load_tail(params, step)

    answer = asyncio.run(load())
    path, _ = _loads(context)
    path.parent.mkdir(parents=True, exist_ok=True)  # the next round weighs the examples trained after this load
    atomic_write_bytes(path, json.dumps({"examples_at_load": int(answer["examples_seen"])}).encode())
    return RecordDict({"loaded": ConfigRecord({"edge": int(_node(context, Node.EDGE_ID)),  # type: ignore[arg-type]
                                               "sha256": str(answer["sha256"])})})  # fmt: skip


def bridge_app() -> ClientApp:
    bridge = ClientApp()

    @bridge.query()
    def answer(msg: Message, context: Context) -> Message:
        what = msg.content[Do.RECORD][Do.WHAT]
        if what == CLASS_SUMS:
            return Message(_class_sums(context, msg), reply_to=msg)
        if what == LOAD_TAIL:
            return Message(_load_tail(context, msg), reply_to=msg)
        raise ValueError(f"the bridge does not know the instruction {what!r}")

    @bridge.train()
    def read_tail(msg: Message, context: Context) -> Message:
        return Message(_read_tail(context), reply_to=msg)

    return bridge


app = bridge_app()
