"""Measure the error of the stored maps per map_dtype against the float64 reference.

Usage: python benchmarks/precision.py [--n-img 4096] [--n-txt 154] [--heads 4] [--head-dim 64] [--backend torch]
Prints, for each map_dtype and heads mode, the max absolute error, the max relative error over entries
above 1e-4, and the smallest reference entry. Inputs: q, k ~ N(0, s^2) with s chosen so the logits spread
like a trained model's (std of q.k * scale about 3).
"""
import argparse

import torch

from seg4diff_fast import joint_attention
from seg4diff_fast.reference import reference_joint_attention


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-img", type=int, default=4096)
    p.add_argument("--n-txt", type=int, default=154)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--logit-std", type=float, default=3.0)
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    n = a.n_img + a.n_txt
    s = a.logit_std ** 0.5
    q, k, v = (torch.randn(1, a.heads, n, a.head_dim, generator=g) for _ in range(3))
    q, k = q * s, k * s
    q, k, v = (t.to(a.device) for t in (q, k, v))
    print(f"device {a.device}, backend {a.backend}, B=1 H={a.heads} N_img={a.n_img} N_txt={a.n_txt} D={a.head_dim}")
    print(f"{'heads':6} {'map_dtype':10} {'max abs err':>12} {'max rel err (>1e-4)':>20} {'min ref':>10} {'max ref':>10}")
    for heads in ("all", "mean"):
        ref = reference_joint_attention(q, k, v, a.n_img, n, capture="i2t", heads=heads)[1]
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            i2t = joint_attention(q, k, v, slice(a.n_img, n), capture="i2t", heads=heads, map_dtype=dt, backend=a.backend)[1].i2t
            err = (i2t.double() - ref).abs()
            big = ref > 1e-4
            rel = (err[big] / ref[big]).max().item()
            print(f"{heads:6} {str(dt).split('.')[1]:10} {err.max().item():12.3e} {rel:20.3e} {ref.min().item():10.2e} {ref.max().item():10.2e}")


if __name__ == "__main__":
    main()
