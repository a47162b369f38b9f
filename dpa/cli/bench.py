"""``dpa bench``: ours vs torch eager and the seed's phone figures, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dpa.base.atomic import atomic_write_bytes
from dpa.cli.errors import console, user_errors
from dpa.cli.tables import print_records
from dpa.contract.errors import UserError

#: The seed's phone (Nexus 6P, Snapdragon 810), batch 8 at conv1_1: load < 0.4 s, forward < 0.6 s,
#: backward < 0.2 s per sample, memory < 500 MB.
SEED_PHONE = {"batch_load_s": 0.4, "forward_s": 0.6, "backward_s_per_sample": 0.2, "memory_mb": 500}


# bench_command's longer options, named here so that the command reads as its signature and its body.
_Config = Annotated[
    str,
    typer.Option(
        help="paper (224x224 VGG-Face, conv1_1, batch 8), small, or dlib (dlib's face network "
        "at 150x150, batch 8, against torch and dlib's own descriptor)."
    ),
]


def bench_command(
    config: _Config = "small",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Measure head, tail and split steps against torch, wire bytes, client memory and server throughput."""
    from dpa.runs.bench import CONFIGS, run_bench

    if config == "dlib":
        _dlib_bench(json_out)
        return
    with user_errors():
        if config not in CONFIGS:
            raise UserError(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
        report = run_bench(CONFIGS[config], say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"))
    report["seed_phone"] = SEED_PHONE
    machine = report["machine"]
    title = (f"dpa bench --config {config} (ratios: ours / torch eager, lower is faster)\n"
             f"on {machine['cpu']['summary']}, {machine['threads']} threads")  # fmt: skip
    rows = [
        ("1. head step ratio", f"{report['head_step_ratio']:.2f}", "<= 1.0"),
        ("2. tail step ratio", f"{report['tail_step_ratio']:.2f}", "<= 1.0"),
        ("3. split step ratio (loopback HTTP)", f"{report['split_step_ratio']:.2f}", "<= 1.25"),
        ("3. the same, streamed (--micro-batch 1)", f"{report['split_step_streamed_ratio']:.2f}", "<= 1.25"),
        ("3. per-step overhead: split - head - tail (ms)", f"{report['split_step_overhead_s'] * 1e3:.1f}", "<= 10"),
        ("3. split / (head + tail)", f"{report['split_step_over_parts']:.2f}", "<= 1.15"),
        ("3. streamed / (head + tail)", f"{report['split_step_streamed_over_parts']:.2f}", "<= 1.5"),
        ("3. journal on: split / (head + tail)", f"{report['split_step_journal_over_parts']:.2f}", ""),
        ("4. wire bytes / raw tensor bytes", f"{report['wire_overhead_ratio']:.6f}", "<= 1.01"),
        ("4. --wire-dtype float16: bytes / float32's", f"{report['float16_wire_bytes_ratio']:.3f}", ""),
        ("5. client peak RSS, --micro-batch 1 (MB)", f"{report['client_peak_rss_mb']:.0f}", "<= 300"),
        ("5. client peak RSS, whole batch (MB)", f"{report['client_peak_rss_mb_whole_batch']:.0f}", ""),
        ("5. batch load, 8 images (s)", f"{report['batch_load_s']:.3f}", "< 0.1"),
    ]
    for clients, t in report["throughput"].items():
        rows.append(
            (
                f"6. {clients} client(s): steps/s, p50/p99 ms",
                f"{t['steps_per_s']:.2f}, {t['p50_ms']:.0f}/{t['p99_ms']:.0f}",
                "grows",
            )
        )
    for clients, ratio in report["throughput_scaling"].items():
        if clients != "1":
            target = ">= 2" if clients == "4" else ""
            rows.append((f"6. {clients} clients' steps/s / 1 client's", f"{ratio:.2f}", target))
    for cut, c in report["class_sum_device"].items():  # the seed's phone figures are for conv1_1
        phone = cut == "conv1_1"
        rows += [
            (f"7. class sums at {cut}: head forward, batch {report['config']['batch']} (s)", f"{c['forward_s']:.3f}",
             f"< {SEED_PHONE['forward_s']}" if phone else ""),
            ("7. the same, ours / torch inference", f"{c['forward_ratio']:.2f}", "<= 1.0"),
            (f"7. class sums at {cut}: device peak RSS (MB)", f"{c['peak_rss_mb']:.0f}",
             f"< {SEED_PHONE['memory_mb']}" if phone else ""),
        ]  # fmt: skip
    rows += [
        ("crash safety: journal entry per step (s)", f"{report['journal_append_s']:.3f}", ""),
        ("crash safety: stored reply per step (s)", f"{report['reply_write_s']:.3f}", ""),
        (f"crash safety: tail checkpoint, {report['checkpoint_mb']:.0f} MB (s)", f"{report['checkpoint_s']:.2f}", ""),
    ]
    print_records(console, title, ("figure", "value", "target"), rows)
    console.print(
        f"head step {report['head_step_s']['ours']:.3f} s vs torch {report['head_step_s']['torch']:.3f} s; "
        f"tail step {report['tail_step_s']['ours']:.3f} s vs {report['tail_step_s']['torch']:.3f} s; "
        f"split {report['split_step_s']:.3f} s (streamed {report['split_step_streamed_s']:.3f} s) "
        f"vs monolithic torch {report['monolithic_torch_step_s']:.3f} s"
    )
    if json_out is not None:
        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
        console.print(f"figures: {json_out}")


def _dlib_bench(json_out: Path | None) -> None:
    """``dpa bench --config dlib``: the class-sum device's forward on dlib's network, beside torch and dlib."""
    import tempfile

    from dpa.base.cpu import cpu_info
    from dpa.runs.dlib_cost import dlib_device_cost
    from dpa.runs.lfw_eval import default_export

    with user_errors(), tempfile.TemporaryDirectory() as tmp:

        def say(msg: str) -> None:
            console.print(f"[bold cyan]>[/] {msg}")

        art, flipped = default_export(Path(tmp), say), default_export(Path(tmp), say, flip_average=True)
        say("timing the forward of 8 chips: ours (onnxruntime), torch, dlib; then both flip-averaged")
        report = dlib_device_cost(art, flipped=flipped)
    report["cpu"] = cpu_info().as_json()
    console.print(f"dlib-resnet, 150x150, batch 8, median of {report['repeats']}; {report['cpu']['summary']}")
    for name in ("ours", "torch", "dlib", "ours_flip", "torch_flip"):
        r = report[name]
        console.print(f"  {name:<10} forward {r['forward_ms']:8.1f} ms   peak RSS {r['peak_rss_mb']:6.0f} MB")
    console.print(f"  ours / torch: forward {report['forward_ratio_vs_torch']:.2f}, "
                  f"RSS {report['rss_ratio_vs_torch']:.2f}")  # fmt: skip
    console.print(f"  ours / dlib:  forward {report['forward_ratio_vs_dlib']:.2f}, "
                  f"RSS {report['rss_ratio_vs_dlib']:.2f}")  # fmt: skip
    console.print(f"  flip-averaged, ours / torch: forward {report['forward_ratio_flip_vs_torch_flip']:.2f}, "
                  f"RSS {report['rss_ratio_flip_vs_torch_flip']:.2f}; ours flip-averaged / ours: forward "
                  f"{report['ours_flip']['forward_ms'] / report['ours']['forward_ms']:.2f}")  # fmt: skip
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json_out, (json.dumps(report, indent=2) + "\n").encode())
