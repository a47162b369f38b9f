"""The network families the exporter builds, one registry: a name maps to a builder of the split network.

Callers ask ``family(name)`` and never branch on the name (timm's ``_registry.py`` is the model). Each
family is a module of its own: ``vggface`` (the seed's network) and ``dlib`` (dlib's public face ResNet,
read from its .dat file).
"""

from dpa.contract.choices import NetworkName
from exporter.networks import dlib, vggface
from exporter.networks.family import Family, Split

__all__ = ["Family", "Split", "family"]

_FAMILIES: dict[NetworkName, Family] = {f.name: f for f in (vggface.FAMILY, dlib.FAMILY)}


def family(name: NetworkName | str) -> Family:
    """The family called ``name``; an unknown name raises UserError listing the valid ones."""
    return _FAMILIES[NetworkName.parse(name)]
