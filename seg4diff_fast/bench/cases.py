"""Benchmark shapes: :class:`Case` (one attention problem) and the case lists of the GPU matrix, the CPU runs
and CI."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["Case", "DTYPES", "gpu_cases", "cpu_cases", "quick_cases", "tokens"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

@dataclass(frozen=True)
class Case:
    """One attention problem: a joint sequence of ``n_txt + n_img`` tokens, ``heads`` heads of ``head_dim``."""

    model: str  # "sd3-medium", "flux1-dev", or a label for a custom shape
    resolution: Optional[int]  # image side in pixels (16 px per image token), None for a custom shape
    batch: int
    heads: int
    head_dim: int
    n_txt: int
    n_img: int
    text_first: bool  # Flux order [text, image]; False: SD3 order [image, text]
    dtype: str = "float16"

    @property
    def n(self) -> int:
        return self.n_txt + self.n_img

    @property
    def text_range(self) -> Tuple[int, int]:
        return (0, self.n_txt) if self.text_first else (self.n_img, self.n)

    @property
    def name(self) -> str:
        where = f"{self.resolution}px" if self.resolution else f"img{self.n_img}"
        return f"{self.model}-{where}-txt{self.n_txt}"

    @property
    def flops(self) -> float:
        """4 * N^2 * D * H * B: QK^T and PV over the joint sequence, 2 flops per multiply-add."""
        return 4.0 * self.n ** 2 * self.head_dim * self.heads * self.batch


def tokens(resolution: int) -> int:
    # Both families: VAE factor 8, then 2x2 patches (SD3 patch embed, Flux packing): 16 px per token.
    return (resolution // 16) ** 2


def gpu_cases(
    dtypes: Sequence[str] = ("bfloat16", "float16"),
    batches: Sequence[int] = (1, 2),
    models: Sequence[str] = ("sd3-medium", "flux1-dev"),
) -> List[Case]:
    """The full matrix of issue 5: SD3-medium (24 heads, D 64, 154 and 333 text tokens, text last) at
    1024^2, 2048^2, 3072^2 and Flux.1-dev (24 heads, D 128, 512 text tokens, text first) at 1024^2, 2048^2,
    4096^2; batch 1 and 2; bfloat16 and float16."""
    cases = []
    for dtype in dtypes:
        for batch in batches:
            if "sd3-medium" in models:
                for n_txt in (154, 333):
                    for res in (1024, 2048, 3072):
                        cases.append(Case("sd3-medium", res, batch, 24, 64, n_txt, tokens(res), False, dtype))
            if "flux1-dev" in models:
                for res in (1024, 2048, 4096):
                    cases.append(Case("flux1-dev", res, batch, 24, 128, 512, tokens(res), True, dtype))
    return cases


def cpu_cases(dtypes: Sequence[str] = ("float32", "bfloat16"), batches: Sequence[int] = (1,)) -> List[Case]:
    """Small CPU shapes with the real text lengths and layouts: SD3-like (4 heads, D 64, 154 text + 1024
    image, text last) and Flux-like (4 heads, D 128, 512 text + 1024 image, text first)."""
    cases = []
    for dtype in dtypes:
        for batch in batches:
            cases.append(Case("sd3-like", None, batch, 4, 64, 154, 1024, False, dtype))
            cases.append(Case("flux-like", None, batch, 4, 128, 512, 1024, True, dtype))
    return cases


def quick_cases(dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    """Tiny shapes for CI: 2 heads, odd lengths, both text layouts, batch 2 for the SD3-like one."""
    cases = []
    for dtype in dtypes:
        cases.append(Case("sd3-like", None, 2, 2, 64, 154, 256, False, dtype))
        cases.append(Case("flux-like", None, 1, 2, 128, 77, 300, True, dtype))
    return cases

