"""The API's messages: routes, meta keys, which tensors each message holds, and their encode/decode.

The one owner of a message's layout (``docs/protocol.md`` §3-§5). The device, the server, the bench
and the tests build and read train and eval messages through these functions; nobody restates a
tensor name, a meta key or the API prefix. The byte layout itself is ``wire``'s; the server's checks
against the manifest (shapes, batch limits, label range) are ``runtime_server.validation``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dpa.contract import wire
from dpa.contract.buffers import BufferPool
from dpa.contract.manifest import GraphNames

__all__ = [
    "API_PREFIX",
    "Route",
    "STEP",
    "GLOBAL_STEP",
    "LOSS",
    "TRAIN_REQUEST",
    "TRAIN_REPLY",
    "EVAL_REQUEST",
    "EVAL_REPLY",
    "TrainReply",
    "SessionField",
    "CLIENT_NAME_MAX",
    "route",
    "train_request_specs",
    "train_request_tensors",
    "train_reply_specs",
    "train_reply_tensors",
    "train_request_meta",
    "encode_train_request",
    "encode_train_reply",
    "train_reply_meta",
    "decode_train_reply",
    "encode_eval_request",
    "encode_eval_reply",
    "encode_class_sums",
    "CLASS_SUMS",
    "CLASS_COUNTS",
    "CLASS_SUMS_REQUEST",
    "step_of",
]

API_PREFIX = "/v1"  # every route's prefix; a breaking change to the API gets a new one


class Route:
    """Path templates under ``API_PREFIX`` (aiohttp's ``{name}`` placeholders)."""

    HEALTH = "/health"
    STATUS = "/status"
    TEMPLATES = "/templates"
    SESSIONS = "/sessions"
    SESSION = "/sessions/{session_id}"
    TRAIN = "/sessions/{session_id}/train"
    STORED_REPLY = "/sessions/{session_id}/steps/{step}"
    EVAL = "/sessions/{session_id}/eval"
    CLASS_SUMS = "/sessions/{session_id}/class-sums"
    TAIL = "/tail"  # operators only: GET the tail's parameters, PUT an average (runtime_server.tail_exchange)


def route(template: str, **parts: object) -> str:
    """The full path of ``template`` with its placeholders filled: ``route(Route.TRAIN, session_id=s)``."""
    return API_PREFIX + template.format(**parts)


# Meta keys (the JSON object after a wire header).
STEP = "step"  # train request and reply: the session's step number, 1 for the first
GLOBAL_STEP = "global_step"  # train reply: the tail's update count after this step


class SessionField:
    """JSON field names of ``POST /sessions`` (request and 201 reply) and ``GET /sessions/{id}``."""

    MANIFEST_SHA256 = "manifest_sha256"  # request, required: the export both sides must share
    CLIENT = "client"  # request, optional: a free label for logs (see CLIENT_NAME_MAX)
    SESSION_ID = "session_id"  # reply: the id every later path carries
    STEP = "step"  # reply: the session's last applied step (0 for a new one)
    MAX_BATCH = "max_batch"  # reply: the largest batch a train or eval request may carry
    ACTIVATION_SHAPE = "activation_shape"  # reply: one example's activation shape
    NUM_CLASSES = "num_classes"  # reply: the tail's classes (labels are 0..num_classes-1)
    GLOBAL_STEP = "global_step"  # reply: the tail's update count
    # request, optional; echoed in the reply and GET: how the session's labels are sent, so the server
    # knows what it trains on. {"mechanism": "rr-with-prior", "epsilon": 4.0} or {"mechanism": "clear"}.
    LABELS = "labels"
    # request, optional; echoed in the reply and GET: the gallery row of each of the session's classes
    # (class c's class sums go to row gallery_rows[c] of a server started with --gallery-size), so that an
    # edge server keeps several devices' identities apart (``dpa.federation``). Absent: row c for class c.
    GALLERY_ROWS = "gallery_rows"
    GALLERY_SIZE = "gallery_size"  # reply: the rows of the server's class-sum gallery (GET /templates)


class LabelMechanism:
    """Values of ``labels.mechanism`` in a session request."""

    CLEAR = "clear"  # the true labels
    RR_WITH_PRIOR = "rr-with-prior"  # randomised on the device, epsilon-label-DP per release
    UNSTATED = "unstated"  # the request did not say (an older client)
    # not sent one by one: inside the session's one class-sum release, whose sensitivity covers them
    IN_CLASS_SUMS = "in-class-sums"


def labels_field(epsilon: float) -> dict[str, object]:
    """The session request's ``labels`` object for labels randomised at ``epsilon`` (inf: in clear)."""
    if epsilon == float("inf"):
        return {"mechanism": LabelMechanism.CLEAR}
    return {"mechanism": LabelMechanism.RR_WITH_PRIOR, "epsilon": float(epsilon)}


def parse_labels_field(value: object) -> dict[str, object]:
    """The server's check of ``labels``; ValueError with the reason if it is malformed."""
    if value is None:
        return {"mechanism": LabelMechanism.UNSTATED}
    if not isinstance(value, dict) or value.get("mechanism") not in (
        LabelMechanism.CLEAR,
        LabelMechanism.RR_WITH_PRIOR,
        LabelMechanism.IN_CLASS_SUMS,
    ):
        raise ValueError(
            'labels must be {"mechanism": "clear"}, {"mechanism": "in-class-sums"} or '
            '{"mechanism": "rr-with-prior", "epsilon": > 0}'
        )
    if value["mechanism"] in (LabelMechanism.CLEAR, LabelMechanism.IN_CLASS_SUMS):
        return {"mechanism": value["mechanism"]}
    eps = value.get("epsilon")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (0 < float(eps) < float("inf")):
        raise ValueError(f"labels.epsilon must be a number > 0 (finite) for rr-with-prior, got {eps!r}")
    return {"mechanism": LabelMechanism.RR_WITH_PRIOR, "epsilon": float(eps)}


def parse_gallery_rows(value: object, num_classes: int, gallery_size: int) -> list[int] | None:
    """The server's check of ``gallery_rows``: None (absent) or ``num_classes`` distinct ints in
    ``[0, gallery_size)``; ValueError with the reason otherwise."""
    if value is None:
        return None
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or len(value) != num_classes:  # type: ignore[arg-type]
        raise ValueError(f"gallery_rows must be a list of {num_classes} integers, one row per class")
    rows = [int(v) for v in value]  # type: ignore[union-attr]
    if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= gallery_size:
        raise ValueError(f"gallery_rows must be distinct rows in 0..{gallery_size - 1} (the server's gallery size)")
    return rows


CLIENT_NAME_MAX = 64  # characters of ``client`` kept (non-printable ones dropped first); the rest is cut


LOSS = "loss"  # train reply: the batch's mean cross-entropy, float32 scalar
TEMPLATES = "templates"  # GET /templates reply: (classes, *activation_shape) float32, each class's mean release
COUNTS = "counts"  # ... and (classes,) int64: the releases each mean is over
TEMPLATES_META_STEP = "global_step"  # ... meta: the tail's update count the templates include
TEMPLATES_META_CLASS_SUMS = "class_sum_releases"  # ... meta: the class-sum releases the templates include
CLASS_SUMS = "class_sums"  # POST /class-sums: (classes, *activation_shape) float32, each class's noisy sum
CLASS_COUNTS = "counts"  # ... and (classes,) float32: each class's noisy count

# Which tensors each message holds, in the order a sender writes them.
TRAIN_REQUEST = (GraphNames.ACTIVATION, GraphNames.LABELS)
TRAIN_REPLY = (LOSS, GraphNames.LOGITS, GraphNames.ACTIVATION_GRADIENT)
EVAL_REQUEST = (GraphNames.ACTIVATION,)
EVAL_REPLY = (GraphNames.LOGITS,)
CLASS_SUMS_REQUEST = (CLASS_SUMS, CLASS_COUNTS)


@dataclass(frozen=True)
class TrainReply:
    """A decoded train reply. ``activation_gradient`` is None when the reply was consumed example by
    example as it streamed in (``wire.read_streamed``)."""

    loss: float
    logits: np.ndarray
    activation_gradient: np.ndarray | None
    global_step: int
    step: int  # the session step this answers


def train_request_meta(step: int) -> dict[str, int]:
    return {STEP: step}


def train_reply_meta(*, global_step: int, step: int) -> dict[str, int]:
    return {GLOBAL_STEP: global_step, STEP: step}


def train_request_specs(batch: int, activation_shape: tuple[int, ...], release_dtype: type) -> dict[str, wire.Spec]:
    """Shapes and dtypes of a train request's tensors, for ``wire.allocate`` / ``wire.pieces``."""
    return {
        GraphNames.ACTIVATION: ((batch, *activation_shape), release_dtype),
        GraphNames.LABELS: ((batch,), np.int64),
    }


def train_reply_specs(batch: int, activation_shape: tuple[int, ...], num_classes: int) -> dict[str, wire.Spec]:
    """Shapes and dtypes of a train reply's tensors: its size is known before the step is taken."""
    return {
        LOSS: ((), np.float32),
        GraphNames.LOGITS: ((batch, num_classes), np.float32),
        GraphNames.ACTIVATION_GRADIENT: ((batch, *activation_shape), np.float32),
    }


def train_request_tensors(activation: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {GraphNames.ACTIVATION: activation, GraphNames.LABELS: labels.astype(np.int64, copy=False)}


def train_reply_tensors(
    *, loss: float, logits: np.ndarray, activation_gradient: np.ndarray
) -> dict[str, np.ndarray | np.float32]:
    return {LOSS: np.float32(loss), GraphNames.LOGITS: logits, GraphNames.ACTIVATION_GRADIENT: activation_gradient}


def encode_train_request(activation: np.ndarray, labels: np.ndarray, step: int) -> bytearray:
    return wire.encode(train_request_tensors(activation, labels), train_request_meta(step))


def encode_train_reply(
    *,
    loss: float,
    logits: np.ndarray,
    activation_gradient: np.ndarray,
    global_step: int,
    step: int,
    pool: BufferPool | None = None,
) -> bytearray:
    tensors = train_reply_tensors(loss=loss, logits=logits, activation_gradient=activation_gradient)
    return wire.encode(tensors, train_reply_meta(global_step=global_step, step=step), pool)


def decode_train_reply(message: wire.Message) -> TrainReply:
    t = message.tensors
    return TrainReply(
        loss=float(t[LOSS]),
        logits=t[GraphNames.LOGITS],
        activation_gradient=t.get(GraphNames.ACTIVATION_GRADIENT),
        global_step=int(message.meta.get(GLOBAL_STEP, -1)),
        step=int(message.meta.get(STEP, -1)),
    )


def encode_eval_request(activation: np.ndarray) -> bytearray:
    return wire.encode({GraphNames.ACTIVATION: activation})


def encode_eval_reply(logits: np.ndarray) -> bytearray:
    return wire.encode({GraphNames.LOGITS: logits})


def encode_class_sums(sums: np.ndarray, counts: np.ndarray) -> bytearray:
    """A class-sum release (``dpa.privacy.class_sums``): sums (classes, *activation_shape), counts (classes,)."""
    return wire.encode(
        {CLASS_SUMS: np.asarray(sums, dtype=np.float32), CLASS_COUNTS: np.asarray(counts, dtype=np.float32)}
    )


def step_of(message: wire.Message) -> int | None:
    """The step number in a message's meta, or None where it is missing or not a positive integer."""
    step = message.meta.get(STEP)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        return None
    return step


TAIL_PARAMETERS = "parameters"  # GET/PUT /v1/tail: every tail parameter, float32, flat, in name order
TAIL_LAYOUT = "layout"  # ... meta: [[name, [shape]], ...] in name order, how to cut the flat tensor


def encode_tail(parameters: dict[str, np.ndarray], meta: dict[str, Any]) -> bytearray:
    """A whole tail as one wire message (a tail has more parameters than a message has tensors)."""
    names = sorted(parameters)
    flat = [np.ascontiguousarray(parameters[n], dtype=np.float32).ravel() for n in names]
    layout = [[n, list(np.shape(parameters[n]))] for n in names]
    empty = np.zeros(0, dtype=np.float32)
    return wire.encode({TAIL_PARAMETERS: np.concatenate(flat) if flat else empty}, {**meta, TAIL_LAYOUT: layout})


def decode_tail(message: wire.Message) -> dict[str, np.ndarray]:
    """The parameters of ``encode_tail``'s message, by name; ValueError if its layout does not fit its tensor."""
    layout, flat = message.meta.get(TAIL_LAYOUT), message.tensors.get(TAIL_PARAMETERS)
    if flat is None or list(message.tensors) != [TAIL_PARAMETERS] or flat.ndim != 1 or not isinstance(layout, list):
        raise ValueError(f"a tail is one 1-d tensor {TAIL_PARAMETERS!r} with meta {TAIL_LAYOUT!r}")
    out, at = {}, 0
    for entry in layout:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1]):
            raise ValueError(f"each {TAIL_LAYOUT} entry is [name, [dims]], got {entry!r}")
        size = int(np.prod(entry[1], dtype=np.int64))
        out[entry[0]] = flat[at : at + size].reshape(entry[1])
        at += size
    if at != flat.size or len(out) != len(layout):
        raise ValueError(f"the {TAIL_LAYOUT} covers {at} values of {flat.size}, or names one twice")
    return out
