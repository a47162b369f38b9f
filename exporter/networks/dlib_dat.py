"""Read dlib's serialised face network (``dlib_face_recognition_resnet_model_v1.dat``) into numpy arrays.

Why parse the file rather than ask dlib: dlib's Python API runs the network (``compute_face_descriptor``)
but exposes none of its tensors, and dlib's own ``net_to_xml`` is C++ only. The format is small and
documented by dlib's source (``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h``,
``cuda/tensor.h``):

* integers: one byte ``size | 0x80 if negative``, then ``size`` little-endian bytes of the magnitude;
* strings: an integer length, then the bytes;
* a tensor (version 2): version, then num_samples, k, nr, nc as integers, then the values as little-endian
  float32; an alias tensor: version 1 and the four dimensions, no values;
* a network serialises the loss layer first, then each ``add_layer`` writes its subnetwork *before* its
  own details, so layer details appear innermost first: in forward order, input layer to the last fc.

Each layer's details start with a versioned name (``con_6``, ``affine_2``, ``fc_3``...). The reader walks
the file from one such name to the next, reading each layer it needs in full (so that float data is never
scanned for names), and returns the layers in forward order. Only numpy: the exporter turns them into torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpa.contract.errors import UserError

__all__ = ["DatLayer", "read_dat"]

#: Layer-detail names a dlib ResNet of this family writes, with the versions this reader knows.
_NAMES = (
    "input_rgb_image_sized", "con_4", "con_5", "con_6", "affine_", "affine_2", "relu_", "relu_2",
    "max_pool_2", "avg_pool_2", "add_prev_", "fc_2", "fc_3",
)  # fmt: skip
#: A serialised name: the one-byte integer 0x01, its length, then the name.
_NAME_PATTERN = re.compile(
    b"\\x01[\\x01-\\x40](" + b"|".join(re.escape(n.encode()) for n in sorted(_NAMES, key=len, reverse=True)) + b")"
)


@dataclass(frozen=True)
class DatLayer:
    """One layer's details, in forward order. ``kind`` is the name without its version suffix."""

    kind: str  # "input", "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # weights, bias / gamma, beta / mean
    ints: dict[str, int] = field(default_factory=dict)  # strides, paddings, sizes


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def int(self) -> int:
        head = self.data[self.pos]
        size, negative = head & 0x0F, bool(head & 0x80)
        if not 1 <= size <= 8:
            raise UserError(f"dlib file: bad integer header {head:#x} at byte {self.pos}")
        value = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if negative else value

    def float(self) -> float:
        """dlib's portable float: an int64 mantissa and an int16 exponent (``dlib/float_details.h``)."""
        mantissa, exponent = self.int(), self.int()
        return float(mantissa) * 2.0**exponent

    def string(self) -> str:
        n = self.int()
        text = self.data[self.pos : self.pos + n].decode("ascii")
        self.pos += n
        return text

    def shape(self) -> tuple[int, int, int, int]:
        return (self.int(), self.int(), self.int(), self.int())

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise UserError(f"dlib file: tensor version {version} at byte {self.pos} is not supported (only 2)")
        shape = self.shape()
        count = int(np.prod(shape))
        end = self.pos + 4 * count
        if end > len(self.data):
            raise UserError("dlib file is truncated inside a tensor")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).reshape(shape)
        self.pos = end
        return values.astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise UserError(f"dlib file: alias tensor version {version} at byte {self.pos} is not supported")
        return self.shape()


def _read_layer(r: _Reader, name: str) -> DatLayer:
    kind = name.rstrip("_0123456789") if not name.startswith("input") else "input"
    if kind == "input":
        mean = np.array([r.float(), r.float(), r.float()], dtype=np.float64)
        return DatLayer("input", {"mean": mean}, {"rows": r.int(), "cols": r.int()})
    if kind == "con":
        params = r.tensor().ravel()
        ints = {k: r.int() for k in ("filters", "rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")}
        shape, bias_shape = r.alias(), r.alias()
        n = int(np.prod(shape))
        if n + int(np.prod(bias_shape)) != params.size:
            raise UserError(f"dlib file: con_ parameters {params.size} do not fit filters {shape} + biases")
        return DatLayer("con", {"weight": params[:n].reshape(shape), "bias": params[n:].copy()}, ints)
    if kind == "affine":
        params = r.tensor().ravel()
        gamma, _beta = r.alias(), r.alias()
        mode = r.int()
        if mode != 0:  # dlib's CONV_MODE: one gamma and beta per channel
            raise UserError(f"dlib file: affine_ in mode {mode} (only per-channel, 0, is supported)")
        c = int(np.prod(gamma))
        return DatLayer("affine", {"gamma": params[:c].copy(), "beta": params[c : 2 * c].copy()})
    if kind in ("max_pool", "avg_pool"):
        return DatLayer(kind, {}, {k: r.int() for k in ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")})
    if kind == "fc":
        outputs, inputs = r.int(), r.int()
        params = r.tensor().ravel()
        weights, _bias = r.alias(), r.alias()
        mode = r.int()  # dlib's fc_bias_mode: 0 FC_HAS_BIAS, 1 FC_NO_BIAS
        n = int(np.prod(weights))
        w = params[:n].reshape(inputs, outputs)  # dlib computes out = in @ W (num_inputs x num_outputs)
        arrays = {"weight": w.T.copy()}
        if mode == 0:
            arrays["bias"] = params[n : n + outputs].copy()
        return DatLayer("fc", arrays, {"outputs": outputs, "inputs": inputs})
    return DatLayer(kind)  # relu_, add_prev_: no parameters


def read_dat(path: Path) -> list[DatLayer]:
    """The layers of a dlib network file, forward order (input first). Raises UserError on a file that is
    not one (no layer names, a bad integer, a truncated tensor)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read dlib network {path}: {exc.strerror}") from None
    out: list[DatLayer] = []
    pos = 0
    while (match := _NAME_PATTERN.search(data, pos)) is not None:
        name = match.group(1).decode()
        if data[match.start() + 1] != len(name):  # a length byte that does not fit: not a name
            pos = match.start() + 1
            continue
        reader = _Reader(data, match.end())
        try:
            out.append(_read_layer(reader, name))
        except (IndexError, ValueError) as exc:
            raise UserError(f"dlib file {path} is damaged near byte {match.start()}: {exc}") from None
        pos = reader.pos
    if not out or out[0].kind != "input":
        raise UserError(f"{path} is not a dlib network file (no input layer found)")
    return out
