"""Choose the non-private reference's hyperparameters for the shipped public weights, on public faces only.

Writes ``weights/public-vggface-64px-w0.25.pt.reference.json`` (``dpa.runs.reference``), which the demo
reads instead of paying the fine-tunes again (about 4 min on 2 cores). Run from the repository root:

    python scripts/tune_reference.py
"""

from pathlib import Path

from dpa.contract.architecture import ArchConfig
from dpa.runs.reference import Preprocess, ReferenceConfig, tune_reference, tuning_path
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS, shipped_info
from exporter.export import VGGFACE_MEAN
from exporter.pretrain import PRETRAIN_PIXEL_STD

if __name__ == "__main__":  # the synthetic faces are drawn by worker processes (spawn)
    config = shipped_info()["config"]
    arch = ArchConfig(image_size=int(config["image_size"]), width=float(config["width"]), num_classes=10, dropout=0.0)
    pre = Preprocess(arch.image_size, tuple(VGGFACE_MEAN), (PRETRAIN_PIXEL_STD,) * 3)
    out = tuning_path(SHIPPED_WEIGHTS)
    result = tune_reference(
        SHIPPED_WEIGHTS, arch, pre, ReferenceConfig(), cache=out, workdir=Path("runs/reference-tuning")
    )
    print(f"wrote {out}: probe C {result['probe_c']:g}, fine-tune lr {result['fine_tune_lr']:g}")
