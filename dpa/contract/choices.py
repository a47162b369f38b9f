"""``Choice``: the base of every fixed set of named options (mechanism, device, wire dtype, ...).

One parser for all of them: names are matched case-insensitively after stripping spaces, and an
unknown name raises a ``UserError`` that lists the valid ones. The CLI takes these enums through
typer's own Enum support (``case_sensitive=False``); configs and manifests parse them here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self

from dpa.contract.errors import UserError

__all__ = ["Choice", "NetworkName"]


class Choice(StrEnum):
    """A StrEnum whose ``parse`` accepts a member or its name in any case."""

    @classmethod
    def what(cls) -> str:
        """What one member is called in messages: the class name in words (``ReleaseDtype`` -> "release dtype")."""
        return " ".join(re.findall(r"[A-Z][a-z0-9]*", cls.__name__)).lower()

    @classmethod
    def parse(cls, value: object) -> Self:
        if isinstance(value, cls):
            return value
        valid = ", ".join(m.value for m in cls)
        if not isinstance(value, str):
            raise UserError(f"{cls.what()} must be one of: {valid}; got {value!r}")
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise UserError(f"unknown {cls.what()} {value!r}; valid: {valid}") from None


class NetworkName(Choice):
    """The network families ``dpa export`` builds (``exporter.networks``' registry)."""

    VGGFACE = "vggface"  # the seed's network (Parkhi et al., 2015): trained from scratch or from --weights
    DLIB_RESNET = "dlib-resnet"  # dlib's public face ResNet (face-recognition-models, CC0): knows real people

    @classmethod
    def what(cls) -> str:
        return "network"
