"""VGG-Face in PyTorch (the seed's network): its parts live with the other families in ``exporter.networks``;
this name stays for the exporter's, the audit's and the runs' imports."""

from exporter.networks.family import RELEASE_PROJECTION
from exporter.networks.vgg_parts import VGGFacePart, build_parts, init_weights, load_weights, project_parts

__all__ = ["RELEASE_PROJECTION", "VGGFacePart", "build_parts", "init_weights", "load_weights", "project_parts"]
