"""Privacy math: clipping, noise calibration, the mechanism and the whole-run accountant. Pure numpy/scipy, no I/O."""
