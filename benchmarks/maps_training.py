"""One training step's map loss: ours (``joint_attention``, maps differentiable without the N x N matrix) vs
the paper's full-matrix path (autograd through the explicit ``[B, H, N, N]`` softmax of
``seg4diff_fast.reference``, in the model's dtype), side by side: median time and peak memory of forward +
backward, and the gradient error of each against float64 autograd through the same reference.

The step: ``out, maps = joint_attention(q, k, v, ..., capture="i2t", heads="mean", normalize=...)``, then a
focal + dice loss of the i2t maps against random binary masks (sigmoid focal, alpha 0.25, gamma 2, x 0.1;
dice x 0.2, per text column over the image tokens, as Seg4Diff's mask loss), plus ``mean(out^2)`` standing
in for the denoising loss, so that out's gradient flows too; ``backward()`` to q, k, v.

Peak memory is what the step allocates above what was allocated before it (inputs excluded): on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU from the allocator events of ``torch.profiler``
(``profile_memory``; a separate run from the timed ones). Times: median of ``--repeats`` runs after one
warm-up. Usage (CPU, small shapes; the GPU shapes 1024^2 / 2048^2 are for the GPU measurement issue):

    python benchmarks/maps_training.py                      # CPU presets -> benchmarks/results/maps-training-*
    python benchmarks/maps_training.py --device cuda --preset gpu
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from seg4diff_fast import joint_attention
from seg4diff_fast._io import atomic_write_bytes, atomic_write_json
from seg4diff_fast.reference import reference_joint_attention

# (name, B, H, N_img, T, D): SD3's heads and head dim, text last; the CPU ones shrink heads / image tokens.
PRESETS = {
    "cpu": [
        ("sd3-512^2 (1024 img, 154 txt), 24 heads", 1, 24, 1024, 154, 64),
        ("sd3-1024^2 (4096 img, 154 txt), 4 heads", 1, 4, 4096, 154, 64),
    ],
    "gpu": [
        ("sd3-1024^2 (4096 img, 154 txt)", 1, 24, 4096, 154, 64),
        ("sd3-2048^2 (16384 img, 333 txt)", 1, 24, 16384, 333, 64),
    ],
}
NORMALIZE = ("logits", "joint")


def mask_loss(i2t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal (alpha 0.25, gamma 2) x 0.1 + dice x 0.2 of maps ``[B, N_img, T]`` against {0, 1} masks of
    the same shape (each text column is one mask over the image tokens)."""
    x = i2t.float()
    prob = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * target + 0.75 * (1 - target))).mean()
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return 0.1 * focal + 0.2 * dice.mean()


def step_fn(path, normalize, q, k, v, text_start, text_stop, target, backend):
    """The training step as a closure that returns the leaves' gradients ``(dq, dk, dv)``."""

    def step():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        if path == "ours":
            out, maps = joint_attention(*leaves, slice(text_start, text_stop), capture="i2t", heads="mean",
                                        map_dtype=q.dtype, backend=backend, normalize=normalize)
            i2t = maps.i2t
        else:  # the paper's full-matrix path, in the model's dtype
            out, i2t, _ = reference_joint_attention(*leaves, text_start, text_stop, capture="i2t", heads="mean",
                                                    compute_dtype=None, normalize=normalize)
        loss = mask_loss(i2t, target.to(i2t.device)) + out.float().square().mean()
        loss.backward()
        return [t.grad for t in leaves]

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def peak_bytes(fn, device):
    """``(peak, largest)``: bytes allocated at the peak of fn() above the start, and its largest single
    allocation (CPU only; None on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []

    def walk(node):
        if node.tag == torch._C._profiler._EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    total = peak = largest = 0
    for _, size in sorted(allocs):
        total += size
        peak = max(peak, total)
        largest = max(largest, size)
    return peak, largest


def grad_errors(grads, q, k, v, text_start, text_stop, target, normalize):
    """Max |g - g64| / max |g64| of dq, dk, dv against float64 autograd through the reference."""
    want = step_fn("paper", normalize, q.double(), k.double(), v.double(), text_start, text_stop, target.double(),
                   None)()
    return {name: ((g.double() - w).abs().max() / w.abs().max()).item()
            for name, g, w in zip(("dq", "dk", "dv"), grads, want)}


def environment(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    import triton

    return {
        "device": name, "device_type": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
    }


def run(device, preset, repeats, backend, errors_up_to, chunk_mib):
    from seg4diff_fast import attention

    rows = []
    for name, b, h, n_img, t, d in PRESETS[preset]:
        n = n_img + t
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        target = (torch.rand(b, n_img, t, generator=g) < 0.3).float()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        q, k, v, target = (x.to(device) for x in (q, k, v, target))
        q, k, v = (x.to(dtype) for x in (q, k, v))
        for normalize in NORMALIZE:
            # ours at each chunk budget of the torch paths (attention._TORCH_CHUNK_BYTES), then the paper's
            for path, mib in [("ours", m) for m in chunk_mib] + [("paper", None)]:
                if mib is not None:
                    attention._TORCH_CHUNK_BYTES = mib * 2**20
                fn = step_fn(path, normalize, q, k, v, n_img, n, target, backend)
                row = {"shape": name, "B": b, "H": h, "N_img": n_img, "T": t, "D": d, "dtype": str(dtype),
                       "normalize": normalize, "path": path, "chunk_mib": mib}
                try:
                    row["time_ms"], row["times_ms"] = median_ms(fn, device, repeats)
                    row["peak_bytes"], row["largest_alloc_bytes"] = peak_bytes(fn, device)
                    if n <= errors_up_to:
                        row["grad_rel_err"] = grad_errors(fn(), q.float(), k.float(), v.float(), n_img, n,
                                                          target, normalize)
                except torch.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {e}".splitlines()[0]
                row["n_by_n_bytes"] = b * h * n * n * torch.finfo(dtype).bits // 8
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "times_ms"}), flush=True)
                rows.append(row)
    return rows


def markdown(result) -> str:
    env = result["environment"]
    lines = [
        "# One training step's map loss: ours vs the full-matrix path",
        "",
        f"{env['device']} ({env['device_type']}, {env['threads']} threads), torch {env['torch']}, triton "
        f"{env['triton']}, {env['date']}, commit {env['commit']}. Command: `{result['command']}`.",
        "",
        "Step: forward + backward of focal/dice on the head-mean i2t maps + mean(out^2). Time: median of "
        f"{result['repeats']} runs. Peak: bytes allocated above the step's start. N x N: one [B, H, N, N] "
        "matrix in the input dtype. Gradient error: max |g - g64| / max |g64| over dq, dk, dv vs float64 "
        "autograd through the reference.",
        "",
        "| shape | normalize | path | median ms | peak MB | largest alloc MB | N x N MB | grad err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        path = "paper (full matrix)" if r["path"] == "paper" else f"ours, {r['chunk_mib']} MiB chunks"
        if "error" in r:
            cells = ["OOM"] * 3
        else:
            cells = [f"{r['time_ms']:.0f}", f"{r['peak_bytes'] / 2**20:.1f}",
                     "-" if r["largest_alloc_bytes"] is None else f"{r['largest_alloc_bytes'] / 2**20:.1f}"]
        err = r.get("grad_rel_err")
        lines.append(f"| {r['shape']} | {r['normalize']} | {path} | {' | '.join(cells)} | "
                     f"{r['n_by_n_bytes'] / 2**20:.1f} | {'-' if err is None else f'{max(err.values()):.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shapes (default: the device's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    ap.add_argument("--backend", default=None, help="joint_attention backend (default: torch on CPU, auto on CUDA)")
    ap.add_argument("--errors-up-to", type=int, default=2048,
                    help="compute float64 gradient errors for N up to this (default 2048)")
    ap.add_argument("--chunk-mib", default=None,
                    help="comma-separated chunk budgets (MiB) of the torch paths for ours (default: 256,16 on the "
                         "CPU, 256 on CUDA)")
    ap.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/"
                                                "maps-training-<device>-<date>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    backend = args.backend or ("auto" if device.type == "cuda" else "torch")
    chunk_mib = [int(x) for x in (args.chunk_mib or ("256" if device.type == "cuda" else "256,16")).split(",")]
    rows = run(device, preset, args.repeats, backend, args.errors_up_to, chunk_mib)
    result = {"environment": environment(device), "command": " ".join(["python"] + sys.argv),
              "repeats": args.repeats, "backend": backend, "rows": rows}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"maps-training-{device.type}-{result['environment']['date'][:10]}")
    atomic_write_json(out + ".json", result)
    atomic_write_bytes(out + ".md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
