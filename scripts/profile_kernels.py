"""Where the small configuration's head and tail steps spend their time, per kernel, against torch (issue 22).

    python scripts/profile_kernels.py            # about 1 min on 2 cores; figures in BENCHMARKS.md

`dpa bench --config small` gives one ratio per step; this breaks them down on the same export (64x64,
width 0.25, cut conv1_1, batch 8), so that a CPU's ratio can be tied to the kernels it runs:

1. the tail's training step with onnxruntime's profiler at 1 and 2 intra-op threads (milliseconds per
   step by operator), and torch's step at 1 and 2 threads;
2. one 3x3 convolution at the tail's four shapes, in an onnxruntime inference session with the weight as
   an input (what a training graph has: MLAS's im2col + SGEMM path) and as a constant initializer (which
   lets onnxruntime reorder it to its NCHWc layout and run its direct convolutions: inference only), and
   in torch (oneDNN), each at 1 and 2 threads;
3. the device's head step in parts: onnxruntime's forward and its backward + optimizer step, the DP-A
   release (clip, noise, grid) and its VJP, against torch's whole step and its ``randn_like``.

Timings are medians after a warm-up; run it on a quiet machine.
"""

from __future__ import annotations

import collections
import gc
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from dpa.base.cpu import cpu_info
from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import OptimizerConfig, load_manifest
from dpa.contract.ort_training import CheckpointState, Module, Optimizer, session_options
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.privacy.noise_source import secure_generator
from exporter.export import ExportConfig, export
from exporter.vggface import build_parts, init_weights
from runtime_client.head import HeadModel

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
SHAPES = [(16, 16, 64), (32, 32, 32), (64, 64, 16), (128, 128, 8)]  # (in, out, spatial) of the tail's convs


def median_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def tail_module(artifacts: Path, options: ort.SessionOptions) -> tuple[Module, Optimizer]:
    state = CheckpointState.load_checkpoint(str(artifacts / "tail" / "checkpoint"))
    module = Module(str(artifacts / "tail" / "training_model.onnx"), state,
                    str(artifacts / "tail" / "eval_model.onnx"), device="cpu", session_options=options)  # fmt: skip
    return module, Optimizer(str(artifacts / "tail" / "optimizer_model.onnx"), module)


def tail_profile(artifacts: Path, threads: int, act: np.ndarray, labels: np.ndarray, steps: int = 20) -> dict:
    """Milliseconds per step by operator type, from onnxruntime's own profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = f"{tmp}/tail"
        module, optimizer = tail_module(artifacts, options)
        for _ in range(steps):
            module.train()
            module(act, labels)
            optimizer.step()
            module.lazy_reset_grad()
        del module, optimizer
        gc.collect()  # the profile is written when the sessions end
        per_op: collections.Counter[str] = collections.Counter()
        for path in Path(tmp).glob("*.json"):  # one event per line; sessions may share a file name
            for line in path.read_text().splitlines():
                if '"Node"' in line and "_kernel_time" in line:
                    dur, op = re.search(r'"dur" :(\d+)', line), re.search(r'"op_name" : "(\w+)"', line)
                    if dur and op:
                        per_op[op.group(1)] += int(dur.group(1))
    return {k: v / steps / 1e3 for k, v in per_op.most_common()}


def conv_model(x: np.ndarray, w: np.ndarray, constant: bool) -> bytes:
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)]
    if not constant:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape))
    graph = helper.make_graph([node], "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")] if constant else [])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _convolutions(rng: np.random.Generator) -> None:
    """2. One 3x3 convolution per shape: onnxruntime with the weight as an input or a constant, and torch."""
    print("\n2. one 3x3 convolution, batch 8 (ms): onnxruntime weight as input / as constant, torch")
    for cin, cout, hw in SHAPES:
        xs = rng.random((8, cin, hw, hw), dtype=np.float32)
        w = rng.random((cout, cin, 3, 3), dtype=np.float32)
        row = []
        for constant in (False, True):
            for threads in (1, 2):
                sess = ort.InferenceSession(conv_model(xs, w, constant), session_options(threads),
                                            providers=["CPUExecutionProvider"])  # fmt: skip
                feeds = {"x": xs} if constant else {"x": xs, "w": w}
                row.append(median_ms(lambda s=sess, f=feeds: s.run(None, f)))
        xt, wt = torch.from_numpy(xs), torch.from_numpy(w)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row.append(median_ms(lambda xt=xt, wt=wt: torch.nn.functional.conv2d(xt, wt, padding=1)))
        cells = " | ".join(f"{what} 1t {row[2 * i]:.2f} 2t {row[2 * i + 1]:.2f}"
                           for i, what in enumerate(("weight as input", "constant (NCHWc)", "torch")))  # fmt: skip
        print(f"  {cin:>3}->{cout:<3} {hw:>2}x{hw:<2}  {cells}")


def main() -> None:
    print(f"CPU: {cpu_info().describe()}; onnxruntime {ort.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "small"
        export(ExportConfig(arch=ARCH, cut="conv1_1", optimizer=OptimizerConfig(lr=1e-3), out=artifacts, verify=False))
        head, tail = build_parts(ARCH, "conv1_1")
        init_weights((head, tail), 0)
        x = rng.standard_normal((8, 3, 64, 64), dtype=np.float32)
        act = np.ascontiguousarray(head(torch.from_numpy(x)).detach().numpy())
        labels = rng.integers(0, 10, 8)

        print("\n1. tail training step (ms per step by operator; onnxruntime's profiler)")
        for threads in (1, 2):
            ops = tail_profile(artifacts, threads, act, labels)
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(ops.items())[:6])
            print(f"  onnxruntime, {threads} thread(s): kernels {sum(ops.values()):.1f} ms: {top}")
        topt = torch.optim.SGD(tail.parameters(), lr=1e-3)
        ta, tl = torch.from_numpy(act), torch.from_numpy(labels)

        def torch_tail() -> None:
            loss = torch.nn.functional.cross_entropy(tail(ta.detach().requires_grad_(True)), tl)
            topt.zero_grad()
            loss.backward()
            topt.step()

        for threads in (1, 2):
            torch.set_num_threads(threads)
            module, optimizer = tail_module(artifacts, session_options(threads))

            def ort_tail(module: Module = module, optimizer: Optimizer = optimizer) -> None:
                module.train()
                module(act, labels)
                optimizer.step()
                module.lazy_reset_grad()

            print(f"  whole step, {threads} thread(s): onnxruntime {median_ms(ort_tail):.1f} ms, "
                  f"torch {median_ms(torch_tail):.1f} ms")  # fmt: skip

        _convolutions(rng)

        print("\n3. head step in parts (ms, 2 threads)")
        torch.set_num_threads(2)
        manifest = load_manifest(artifacts)
        model = HeadModel(artifacts, manifest, resolve_device("cpu"))
        up = rng.standard_normal((8, *manifest.activation_shape), dtype=np.float32)
        a = model.forward(x)
        slot, vjp = np.empty_like(up), np.empty_like(up)
        dp = DPActivations(DPConfig(clip=100.0, epsilon=8.0), secure_generator(None))
        _, ctx = dp.release(a, out=slot)
        xt, gt = torch.from_numpy(x), torch.from_numpy(up)
        hopt = torch.optim.SGD(head.parameters(), lr=1e-3)

        def torch_head() -> None:
            out = head(xt)
            hopt.zero_grad()
            out.backward(gt)
            hopt.step()

        z = np.empty(up.size, dtype=np.float32)
        gen = secure_generator(None)
        print(f"  onnxruntime forward {median_ms(lambda: model.forward(x)):.2f}, "
              f"backward + step {median_ms(lambda: model.backward_step(x, up)):.2f}; "
              f"torch forward + backward + step {median_ms(torch_head):.2f}")  # fmt: skip
        print(f"  release (clip, AES noise on 2 streams, grid) {median_ms(lambda: dp.release(a, out=slot)):.2f}, "
              f"its VJP {median_ms(lambda: dp.backward(ctx, up, out=vjp)):.2f}; "
              f"{up.size} float32 normals on one thread {median_ms(lambda: gen.standard_normal(dtype=np.float32, out=z)):.2f}; "  # noqa: E501
              f"torch randn_like {median_ms(lambda: torch.randn_like(gt)):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
