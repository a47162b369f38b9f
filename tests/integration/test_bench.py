"""`dpa bench` produces every figure the tracking JSON promises (timings are not asserted)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dpa.runs.bench import CONFIGS, run_bench


def test_bench_reports_every_figure():
    cfg = replace(CONFIGS["small"], repeats=1, clients=(1, 2), steps_per_client=2)
    report = run_bench(cfg, say=lambda _msg: None)
    for key in (
        "head_step_ratio",
        "tail_step_ratio",
        "split_step_ratio",
        "split_step_streamed_ratio",
        "wire_overhead_ratio",
        "client_peak_rss_mb",
        "batch_load_s",
        "throughput",
        "config",
        "journal_append_s",
        "reply_write_s",
        "checkpoint_s",
    ):
        assert key in report, key
    assert set(report["throughput"]) == {"1", "2"}
    assert report["checkpoint_mb"] > 1 and report["journal_append_s"] > 0
    assert all(t["steps_per_s"] > 0 and t["p99_ms"] >= t["p50_ms"] > 0 for t in report["throughput"].values())
    # Wire bytes per step by the protocol's arithmetic (docs/protocol.md), activation 8x16x64x64 float32:
    # request = 16 header + 19 meta {"step":1000000000} -> 40, (4 + 10 "activation" + 16 dims -> 32) + act,
    #           (4 + 6 "labels" + 4 -> 16) + 64 = 152 + act;
    # reply = 16 + 44 meta {"global_step":1000000000,"step":1000000000} -> 64, "loss" 8 + 4 -> 80,
    #         "logits" 4 + 6 + 8 -> 104 + 320 = 424, "activation_gradient" 4 + 19 + 16 -> 464, + act.
    act = 8 * 16 * 64 * 64 * 4
    assert report["wire_bytes_per_step"] == (152 + act) + (464 + act)
    assert report["raw_tensor_bytes_per_step"] == 2 * act + 8 * 8 + 4 + 8 * 10 * 4
    assert report["wire_overhead_ratio"] < 1.0001
    # float16 release: the request's activation at 2 bytes per element; the header is the same.
    assert report["wire_bytes_per_step_float16"] == (152 + act // 2) + (464 + act)
    assert report["torch_loaded"] is False  # the measured device client never imported torch
    assert 0 < report["client_peak_rss_mb"] < 2000 and np.isfinite(report["head_step_ratio"])
    # Which CPU it ran on, as BENCHMARKS.md keeps its figures per CPU kind (issue 22).
    assert report["machine"]["cpu"]["summary"] and report["machine"]["torch_cpu_capability"] in (
        "AVX512",
        "AVX2",
        "DEFAULT",
    )
    assert report["machine"]["threads"] >= 1
    # The class-sum recipe's device cost (issue 23): the frozen head's forward at the bench's cut and at fc7.
    costs = report["class_sum_device"]
    assert set(costs) == {"conv1_1", "fc7"}
    for c in costs.values():
        assert c["forward_s"] > 0 and c["torch_forward_s"] > 0 and 0 < c["peak_rss_mb"] < 2000
        assert c["forward_ratio"] == c["forward_s"] / c["torch_forward_s"]


def test_dlib_device_cost_measures_all_three_in_their_own_processes(tmp_path) -> None:
    """dpa bench --config dlib's figures: ours, torch and dlib each timed and their peak RSS read (no speed
    target here: those live in BENCHMARKS.md)."""
    from dpa.runs.dlib_cost import dlib_device_cost
    from dpa.runs.lfw_eval import default_export

    flipped = default_export(tmp_path, lambda _m: None, flip_average=True)
    report = dlib_device_cost(default_export(tmp_path, lambda _m: None), flipped=flipped, batch=2, repeats=1)
    for name in ("ours", "torch", "dlib", "ours_flip", "torch_flip"):
        assert report[name]["forward_ms"] > 0 and report[name]["peak_rss_mb"] > 10
    assert report["forward_ratio_vs_dlib"] == report["ours"]["forward_ms"] / report["dlib"]["forward_ms"]
    assert report["forward_ratio_flip_vs_torch_flip"] == (report["ours_flip"]["forward_ms"]
                                                          / report["torch_flip"]["forward_ms"])  # fmt: skip
    assert report["batch"] == 2 and report["image_size"] == 150
    assert report["ours"]["torch_loaded"] is False  # the device's process holds no torch: its RSS is its own
