"""One private split-training step: head forward, DP-A release, server step, head backward.

``SplitTrainer.step`` sends one batch's release (whole, or streamed example by example with
``micro_batch``) and applies the activation gradient the server returns to the head.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from dpa.base.finite import all_finite
from dpa.contract import messages, wire
from dpa.contract.errors import UserError
from dpa.contract.manifest import GraphNames
from dpa.contract.messages import TrainReply
from dpa.privacy.mechanism import DPActivations, ReleaseContext
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.head import HeadModel

__all__ = ["SplitTrainer", "StepResult", "SentRelease"]

#: Told of every training release just before it goes: (session step, activation as sent, labels as sent).
SentRelease = Callable[[int, np.ndarray, np.ndarray], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    loss: float
    correct: int
    batch: int
    fraction_clipped: float
    global_step: int
    logits: np.ndarray | None = None  # the server's logits for the batch (computed from the release)


class SplitTrainer:
    """One device's half of split training, bound to an open server session.

    Each step carries the session step number (``step + 1``); the server applies it once,
    and a retry of the same bytes after a lost answer gets the stored reply. With
    ``micro_batch`` the device never holds a batch of activations: each group of
    examples is run through the head and released straight into the request buffer, and
    for the backward pass their activations are recomputed (for conv1_1, one convolution)
    and their gradients accumulated before one optimizer step. Same update, same privacy
    (every example gets its own noise either way), a fraction of the memory.
    """

    def __init__(
        self,
        head: HeadModel,
        edge: EdgeClient,
        session_id: str,
        dp: DPActivations,
        micro_batch: int | None = None,
        step: int = 0,
        release_dtype: wire.ReleaseDtype = wire.ReleaseDtype.FLOAT32,
        on_sent: SentRelease | None = None,
    ) -> None:
        if micro_batch is not None and micro_batch < 1:
            raise UserError(f"micro batch must be >= 1, got {micro_batch}")
        self.head = head
        self.edge = edge
        self.session_id = session_id
        self.dp = dp
        self.micro_batch = micro_batch
        self.release_dtype = wire.ReleaseDtype.parse(release_dtype)
        self.step_number = step  # the session's last step whose update this head holds
        self.rollbacks = 0  # times the server was found behind this device (see _send)
        self.on_sent = on_sent  # e.g. the recorded view (``--record-view``)
        self._scratches: dict[str, np.ndarray] = {}

    async def step(self, images: np.ndarray, labels: np.ndarray, stored: TrainReply | None = None) -> StepResult:
        """One private step. With ``stored`` (the server's reply to this very step, fetched after
        the device crashed) nothing is sent: the release is recomputed only to advance the noise
        generator exactly as the first time, and the stored gradient is applied."""
        if self.micro_batch is not None and stored is None:
            return await self._streamed_step(images, labels, self.micro_batch)
        size = self.micro_batch if self.micro_batch is not None else len(labels)
        batch = len(labels)
        body, slots = wire.allocate(
            self._request_specs(batch), messages.train_request_meta(self.step_number + 1), self.edge.buffers
        )
        slots[GraphNames.LABELS][...] = labels
        clipped = 0
        kept: list[ReleaseContext] = []
        for start in range(0, batch, size):
            part = slice(start, start + size)
            slot = slots[GraphNames.ACTIVATION][part]
            # A whole batch keeps its forward's tensors for the backward (micro-batches recompute instead).
            act = self.head.forward(images[part], keep=self.micro_batch is None)
            if slot.dtype == np.float32:  # the release is written straight into the message
                noisy, ctx = self.dp.release(act, out=slot)
            else:
                noisy, ctx = self.dp.release(act, out=self._scratch("release", slot.shape))
                self._on_wire(noisy, out=slot)
            clipped += int(ctx.clipped.sum())
            if self.micro_batch is None:
                kept.append(ctx)
        if self.on_sent is not None and stored is None:  # the message's own bytes, as they will go
            self.on_sent(self.step_number + 1, slots[GraphNames.ACTIVATION], slots[GraphNames.LABELS])
        del slots, noisy, ctx
        reply = stored if stored is not None else await self._send(body)
        del body
        gradient = self._checked(reply.activation_gradient, (batch, *self.head.activation_shape))
        upstream = self._scratch("upstream", gradient.shape)
        for index, start in enumerate(range(0, batch, size)):
            part = slice(start, start + size)
            # Micro-batches recompute the activations instead of keeping them.
            ctx = kept[index] if kept else self.dp.context(self.head.forward(images[part]))
            self.head.accumulate(images[part], self.dp.backward(ctx, gradient[part], out=upstream[part]))
        return self._finish(reply, labels, clipped)

    def _scratch(self, use: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array kept from step to step, one per use: the clipping VJP's output, and the
        release before it is rounded to float16 (``dpa.contract.buffers`` says why fresh ones cost)."""
        kept = self._scratches.get(use)
        if kept is None or kept.shape != shape:
            kept = self._scratches[use] = np.empty(shape, dtype=np.float32)
        return kept

    def _on_wire(self, noisy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The release in the dtype it travels in (into ``out`` if given); float16 only where it fits."""
        wire_dtype = self.release_dtype.numpy
        if noisy.dtype == wire_dtype and out is None:
            return noisy
        with np.errstate(over="ignore"):
            if out is None:
                out = noisy.astype(wire_dtype)
            else:
                np.copyto(out, noisy, casting="same_kind")
        if not all_finite(out):
            raise UserError(
                f"this release exceeds {wire_dtype.name}'s range (largest |value| {float(np.abs(noisy).max()):.3g}); "
                "send it as float32 (--wire-dtype float32)"
            )
        return out

    @staticmethod
    def _checked(gradient: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """The server's d loss / d activation, refused before it reaches the head unless it has
        ``shape`` and holds only numbers: the server is not trusted, and one NaN would make
        every head weight NaN."""
        if gradient is None or gradient.shape != shape or gradient.dtype != np.float32:
            got = "none" if gradient is None else f"{gradient.dtype} {gradient.shape}"
            raise EdgeError(0, "bad_reply", f"the server's activation gradient is {got}, expected float32 {shape}")
        if not all_finite(gradient):
            raise EdgeError(0, "bad_reply", "the server's activation gradient contains NaN or infinity")
        return gradient

    def _request_specs(self, batch: int) -> dict[str, wire.Spec]:
        return messages.train_request_specs(batch, self.head.activation_shape, self.release_dtype.numpy)

    def _finish(self, reply: TrainReply, labels: np.ndarray, clipped: int, *, update: bool = True) -> StepResult:
        """The optimizer step on the accumulated gradients (``update``; a frozen head has none), and the
        step's figures."""
        batch = len(labels)
        if reply.logits.ndim != 2 or reply.logits.shape[0] != batch:
            self.head.reset_gradients()
            shape = reply.logits.shape
            raise EdgeError(0, "bad_reply", f"the server's logits have shape {shape}, expected ({batch}, classes)")
        if update:
            self.head.step()
        self.step_number = reply.step if reply.step > 0 else self.step_number + 1
        correct = int((reply.logits.argmax(axis=1) == labels).sum())
        return StepResult(reply.loss, correct, batch, clipped / max(batch, 1), reply.global_step, reply.logits)

    async def _streamed_step(self, images: np.ndarray, labels: np.ndarray, size: int) -> StepResult:
        """The micro-batch step with neither the request nor the reply ever whole in memory.

        The request is produced while it uploads: ``size`` examples at a time are run through
        the head and released. A retried upload restores the noise generator first, so it
        sends the same bytes. The reply's gradient is consumed example by example: each
        example's activation is recomputed and its gradient accumulated, then one step.
        """
        batch = len(labels)
        specs = self._request_specs(batch)
        start_state = self.dp.rng_state
        clipped = [0]
        sent: list[np.ndarray] = []  # for ``on_sent`` only: the streamed activations as they went

        async def produce(pieces: list[bytes | str]) -> AsyncIterator[bytes | memoryview]:
            self.dp.rng_state = start_state
            clipped[0] = 0
            sent.clear()
            for piece in pieces:
                if isinstance(piece, bytes):
                    yield piece
                elif piece == GraphNames.LABELS:
                    yield labels.astype("<i8").tobytes()
                else:
                    for start in range(0, batch, size):
                        noisy, ctx = self.dp.release(self.head.forward(images[start : start + size]))
                        clipped[0] += int(ctx.clipped.sum())
                        on_wire = np.ascontiguousarray(self._on_wire(noisy))
                        if self.on_sent is not None:
                            sent.append(on_wire.copy())
                        yield memoryview(on_wire).cast("B")

        received = [0]

        def on_start() -> None:
            self.head.reset_gradients()  # a retried attempt accumulates from zero again
            received[0] = 0

        def on_example(i: int, gradient: np.ndarray) -> None:
            gradient = self._checked(gradient[None], (1, *self.head.activation_shape))
            ctx = self.dp.context(self.head.forward(images[i : i + 1]))  # recomputed, not kept
            upstream = self.dp.backward(ctx, gradient, out=self._scratch("upstream", gradient.shape))
            self.head.accumulate(images[i : i + 1], upstream)
            received[0] += 1

        try:
            for first_try in (True, False):
                length, pieces = wire.pieces(specs, messages.train_request_meta(self.step_number + 1))
                try:
                    reply = await self.edge.train_streamed(
                        self.session_id, length, partial(produce, pieces), batch, on_start, on_example
                    )
                    break
                except EdgeError as exc:
                    if not (first_try and self._rolled_back(exc)):
                        raise
            if received[0] != batch:  # the gradient was missing or not split by example
                got = f"gradients for {received[0]} of {batch} examples"
                raise EdgeError(0, "bad_reply", f"the server's reply held {got}")
            if self.on_sent is not None:  # recorded once the upload is whole (a retry re-sends the same bytes)
                self.on_sent(self.step_number + 1, np.concatenate(sent), labels.astype("<i8"))
        except BaseException:
            self.head.reset_gradients()  # nothing half-accumulated reaches a later step
            raise
        return self._finish(reply, labels, clipped[0])

    async def _send(self, body: bytearray) -> TrainReply:
        """Send a step; after a rollback (``_rolled_back``) the same release goes again, renumbered."""
        try:
            return await self.edge.train_message(self.session_id, body)
        except EdgeError as exc:
            if not self._rolled_back(exc):
                raise
            message = wire.decode(body)
            renumbered = wire.encode(message.tensors, messages.train_request_meta(self.step_number + 1))
            return await self.edge.train_message(self.session_id, renumbered)

    def _rolled_back(self, exc: EdgeError) -> bool:
        """Whether ``exc`` says the server lost steps (it ran without a journal and crashed) and
        asks for an earlier step number; if so, take that number for the pending release."""
        expected = exc.detail.get("expected_step")
        if exc.code != "step_out_of_order" or not isinstance(expected, int) or expected > self.step_number:
            return False
        log.warning("server rolled back", extra={"fields": {"lost_steps": self.step_number + 1 - expected}})
        self.rollbacks += 1
        self.step_number = expected - 1
        return True

    def release(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """The DP-A release of ``images`` as it travels (a fresh array in the wire dtype), and how many
        examples were clipped. For a frozen head, whose releases are kept and sent again."""
        noisy, ctx = self.dp.release(self.head.forward(images))
        return np.array(self._on_wire(noisy), copy=True), int(ctx.clipped.sum())

    async def send_release(
        self, activation: np.ndarray, labels: np.ndarray, *, clipped: int = 0, stored: TrainReply | None = None,
        record: bool = True,
    ) -> StepResult:  # fmt: skip
        """A step with a release made beforehand (``release``) and no head update: the frozen head.
        ``record``: tell ``on_sent`` (False when the same bytes were recorded already)."""
        if stored is None:
            if record and self.on_sent is not None:
                self.on_sent(self.step_number + 1, activation, labels)
            meta = messages.train_request_meta(self.step_number + 1)
            body, slots = wire.allocate(self._request_specs(len(labels)), meta, self.edge.buffers)
            slots[GraphNames.ACTIVATION][...] = activation
            slots[GraphNames.LABELS][...] = labels
            del slots
            reply = await self._send(body)
        else:
            reply = stored
        return self._finish(reply, labels, clipped, update=False)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Class predictions; the test activations are released with the same DP-A mechanism."""
        return await self.predict_activation(self.head.forward(images))

    async def predict_activation(self, activation: np.ndarray) -> np.ndarray:
        """``predict`` from the head's activation, computed before (a frozen head's never changes): the
        release draws fresh noise all the same."""
        noisy, _ = self.dp.release(activation)
        return (await self.edge.evaluate(self.session_id, self._on_wire(noisy))).argmax(axis=1)
