"""The Seg4Diff layer analysis (the paper's Section 3.3): how to find the semantic grounding expert of an MM-DiT.

Per image and chosen timestep, ONE transformer forward with every attention layer captured (head-mean maps are
small: SD3-medium 1024^2, 154 text tokens, i2t + t2i of 24 layers is 121 MB of float32 per prompt, and as much
again for the head layer, whose 24 heads are kept), and per layer:

- the attention budget by interaction type, from the captured blocks' row sums. A row of ``i2t`` (image query,
  joint softmax over all keys) sums to the share of that image token's attention on the text; the rest goes to
  the image. Likewise a row of ``t2i`` is a text token's share on the image. Reported as the mean share per query
  type (``i2i + i2t = 1``, ``t2i + t2t = 1``: the paper's Fig. 3 b-c, with the uniform-attention reference
  ``N_img / N`` and ``T / N``) and as shares of the whole ``N x N`` matrix (``matrix_*``, summing to 1);
- the value norms: the mean L2 norm of the value projection (``to_v`` / ``add_v_proj`` outputs, all heads
  together, ``H * D`` values a token) of the image tokens, of all text tokens, and of the prompt tokens (the
  class names' token columns; padding, BOS/EOS and, for SD3 without T5, the 77 tokens made from zero vectors
  count as text, not prompt). Fused projections (``fuse_qkv_projections``) and Flux.2's single-stream blocks have no
  separate value projection to hook: their norms are ``null``;
- with ground truth, the segmentation mIoU of that layer's maps alone, by the project's Segmenter
  (:meth:`Segmenter.labels_from_i2t`: class token columns, upsampling, argmax) and metrics
  (:func:`confusion_matrix`, :func:`scores_from_confusion`), the dataset protocol ``gt`` (classes present in
  the ground truth, the paper's) or ``full``;
- for one chosen layer (the "head layer", default the protocol's expert), the same for each head alone, and the
  per-head class maps of the first image (a mosaic; when the expert layer found below is another layer, its
  head-mean maps are the mosaic's last row).

The expert layer is the layer of highest mIoU at the first timestep (only with ground truth).

Writes ``OUT/analysis.json`` and the plots ``OUT/layers.png`` (per-layer curves, expert marked) and
``OUT/heads.png`` (per-head mosaic, a colour bar and the mIoU per row; the plots need matplotlib, the ``plot``
extra: without it a warning says so).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .capture import layer_names, register
from .capture.handle import _adapter_for, _find_transformer, _resolve_layers
from .segmentation.metrics import IGNORE_INDEX, confusion_matrix, scores_from_confusion
from .segmentation.segmenter import ForwardBatch, Segmenter
from .segmentation.tokens import PromptColumns

_VALUE_NORM_FAMILIES = ("sd3", "flux", "flux2", "qwenimage")  # value projections laid out as _value_hooks reads them

__all__ = ["AnalysisItem", "AllLayersSource", "analyze", "dataset_items", "generated_items", "register_commands"]

KINDS = ("i2i", "i2t", "t2i", "t2t")


@dataclass
class AnalysisItem:
    """One image to analyse: ``image`` (path, PIL, array or tensor), ``packs`` (its prompts, each with the token
    columns of its classes; prompt ``k`` holds ``packs[k].classes``), ``gt`` ``[H, W]`` int64 label ids of the
    dataset or None, ``class_ids``: the dataset id of each class, in pack order (None without ground truth),
    ``ignore_index``: the label value of unlabelled pixels in ``gt``."""

    id: str
    image: object
    packs: List[PromptColumns]
    gt: Optional[np.ndarray] = None
    class_ids: Optional[List[int]] = None
    ignore_index: int = IGNORE_INDEX


@dataclass
class _Forward:
    """What one image x timestep gave, per layer (filled by :class:`AllLayersSource` over its prompt chunks)."""

    i2t: Dict[str, List[torch.Tensor]] = field(default_factory=dict)  # layer -> [B, N_img, T] (text_index columns)
    heads: List[torch.Tensor] = field(default_factory=list)  # head layer: [B, H, N_img, T]
    budget: Dict[str, np.ndarray] = field(default_factory=dict)  # layer -> sums [i2t row shares, n_img rows, t2i, n_txt]
    norms: Dict[str, np.ndarray] = field(default_factory=dict)  # layer -> sums [image, n, text, n, prompt, n]
    n_img: int = 0
    n_txt: int = 0


class AllLayersSource:
    """An attention source for :class:`Segmenter` (``attention_source(batch) -> i2t``) that captures every
    attention layer in the one forward it runs, and hooks the value projections.

    ``head_layer``: the layer captured with its heads kept. Call :meth:`begin` before each image x timestep
    (with ``{prompt: columns of its prompt tokens}``), then read :attr:`result`. Returns the head layer's
    head-mean i2t ``[B, N_img, T]`` to the Segmenter (any layer would do: the analysis reads :attr:`result`).
    """

    def __init__(self, head_layer: str):
        self.head_layer = head_layer
        self.result = _Forward()
        self._prompt_cols: Dict[str, List[int]] = {}

    def begin(self, prompt_columns: Dict[str, List[int]]) -> None:
        self.result = _Forward()
        self._prompt_cols = prompt_columns

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        tf = batch.transformer
        layers = layer_names(tf)
        if self.head_layer not in layers:
            raise ValueError(f"head layer {self.head_layer!r} is not one of {layers}")
        others = [l for l in layers if l != self.head_layer]
        n_img = batch.grid[0] * batch.grid[1]
        res = self.result
        res.n_img = n_img
        hooks = []
        adapter = _adapter_for(tf)
        if adapter.family in _VALUE_NORM_FAMILIES:  # other families: value norms left out (None in the summary)
            specs = {s.name: s for s in adapter.layers(tf)}
            for name in layers:
                hooks += self._value_hooks(specs[name].attn, name, batch, n_img)
        # The forward runs whole (batch.stop_after_layers is ignored: every layer is wanted).
        mean = register(tf, layers=others, capture="both", heads="mean", map_dtype=torch.float32, batch="all") if others else None
        per_head = register(tf, layers=[self.head_layer], capture="both", heads="all", map_dtype=torch.float32,
                            batch="all")
        try:
            batch.run()
        finally:
            for h in hooks:
                h.remove()
            per_head.remove()
            if mean is not None:
                mean.remove()
        idx = batch.text_index.to(torch.long)
        caught_i2t = dict(mean.store.i2t) if mean is not None else {}
        caught_t2i = dict(mean.store.t2i) if mean is not None else {}
        heads_i2t = per_head.store.i2t[self.head_layer]  # [B, H, N_img, T_all]
        caught_i2t[self.head_layer] = heads_i2t.mean(1)
        caught_t2i[self.head_layer] = per_head.store.t2i[self.head_layer].mean(1)
        for name in layers:
            i2t, t2i = caught_i2t[name], caught_t2i[name]  # [B, N_img, T_all], [B, T_all, N_img]
            res.n_txt = i2t.shape[-1]
            row = np.array([float(i2t.sum(-1).sum()), i2t.shape[0] * i2t.shape[1],
                            float(t2i.sum(-1).sum()), t2i.shape[0] * t2i.shape[1]])
            res.budget[name] = res.budget.get(name, 0) + row
            res.i2t.setdefault(name, []).append(i2t[..., idx.to(i2t.device)])  # stays on the device: upsampled there
        res.heads.append(heads_i2t[..., idx.to(heads_i2t.device)])
        return caught_i2t[self.head_layer][..., idx.to(heads_i2t.device)]

    def _value_hooks(self, attn, name: str, batch: ForwardBatch, n_img: int):
        """Forward hooks on the value projections of ``attn``: ``to_v`` on image tokens (SD3, Flux double-stream)
        or on ``[text, image]`` (Flux single-stream: no ``add_v_proj``); ``add_v_proj`` on text tokens."""
        res = self.result
        cols = [self._prompt_cols.get(p, []) for p in batch.prompts]

        def add(values: torch.Tensor, text_first: bool):  # values [B, N, H*D]
            norms = values.detach().float().norm(dim=-1)  # [B, N]
            n = norms.shape[1]
            if text_first is None:  # image tokens only
                img, txt = norms, None
            elif text_first:
                img, txt = norms[:, n - n_img:], norms[:, :n - n_img]
            else:  # text tokens only
                img, txt = None, norms
            s = np.zeros(6)
            if img is not None:
                s[0:2] = float(img.sum()), img.numel()
            if txt is not None:
                s[2:4] = float(txt.sum()), txt.numel()
                for b, c in enumerate(cols):
                    c = [j for j in c if j < txt.shape[1]]
                    s[4:6] += (float(txt[b, c].sum()), len(c))
            res.norms[name] = res.norms.get(name, 0) + s

        hooks = []
        joint = getattr(attn, "add_v_proj", None) is not None
        if isinstance(getattr(attn, "to_v", None), torch.nn.Module):
            hooks.append(attn.to_v.register_forward_hook(lambda m, a, out: add(out, None if joint else True)))
        if joint:
            hooks.append(attn.add_v_proj.register_forward_hook(lambda m, a, out: add(out, False)))
        return hooks


def dataset_items(segmenter: Segmenter, dataset, protocol: str = "gt") -> Iterator[AnalysisItem]:
    """One :class:`AnalysisItem` per sample of a :class:`SegDataset` (made when reached: one label in memory at a
    time); ``gt`` prompts the classes present in the ground truth (the paper's oracle), ``full`` every class of
    the dataset. Samples without a labelled pixel are skipped."""
    if protocol not in ("gt", "full"):
        raise ValueError(f"protocol must be 'gt' or 'full', not {protocol!r}")
    return _dataset_items(segmenter, dataset, protocol)


def _dataset_items(segmenter: Segmenter, dataset, protocol: str) -> Iterator[AnalysisItem]:
    from .segmentation.evaluate import gt_classes

    for s in dataset.samples:
        gt = dataset.load_label(s)
        present = gt_classes(gt, dataset.ignore_index) if protocol == "gt" else list(range(len(dataset.classes)))
        if not present:
            continue
        names, ids = dataset.prompt_for(present, words=False)  # the class names (voc20b: its background names too)
        packs = segmenter.pack_classes(names)  # the columns where this family's pipeline puts the tokens
        yield AnalysisItem(s.id, s.image, packs, gt, ids, dataset.ignore_index)


def generated_items(segmenter: Segmenter, prompts: Sequence[str], classes: Sequence[str], **generate_kwargs) -> List[AnalysisItem]:
    """Generate an image per prompt (:meth:`Segmenter.generate`, each class named in the prompt), then analyse
    it with its own prompt as the text: no ground truth, so no mIoU."""
    items = []
    for i, prompt in enumerate(prompts):
        res = segmenter.generate(prompt, list(classes), **generate_kwargs)
        items.append(AnalysisItem(f"prompt_{i:03d}", res.image, [PromptColumns(prompt, list(res.classes),
                                                                              res.meta["columns"])]))
    return items


def _resolve_layer(segmenter: Segmenter, layer) -> str:
    tf, _ = _find_transformer(segmenter.transformer)
    return _resolve_layers(_adapter_for(tf), tf, [layer])[0].name


def check_timestep_indices(indices: Sequence[int], steps: int, argument: str = "timestep_indices") -> List[int]:
    """``indices`` into a ``steps``-step schedule, each in ``[-steps, steps - 1]``, no timestep twice (``-8`` and
    ``20`` of a 28-step schedule are one timestep: it would be computed twice and counted twice). Raises
    ``ValueError`` naming ``argument``."""
    seen = {}
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -steps <= i < steps:
            raise ValueError(f"{argument}: {i!r} is not an index into the {steps}-step schedule "
                             f"({-steps}..{steps - 1})")
        if i % steps in seen:
            raise ValueError(f"{argument}: {seen[i % steps]} and {i} are the same timestep of the {steps}-step "
                             "schedule; give each timestep once")
        seen[i % steps] = i
    return list(indices)


#: protocol options the analysis cannot honour: field -> (flag, the only value it takes)
_FIXED_OPTIONS = {"normalize": ("--normalize", "joint"), "heads": ("--heads", "mean"), "tta": ("--tta", False)}


def _check_options(fields: dict, flags: bool = False) -> None:
    """Refuse the protocol options that the analysis cannot honour (``fields``: protocol field -> value)."""
    for field, (flag, only) in _FIXED_OPTIONS.items():
        if fields.get(field, only) != only:
            name = flag if flags else field
            raise ValueError(f"{name}: analyze measures the model's own probabilities (joint softmax), every layer "
                             "head-averaged and the head layer per head, in one forward per image: it does not take "
                             f"{name} (norm_before_merge applies to its per-layer mIoU)")


def analyze(segmenter: Segmenter, items: Iterable[AnalysisItem], out_dir: Optional[str] = None, *,
            timestep_indices: Sequence[int] = (), head_layer=None, num_classes: Optional[int] = None,
            class_names: Optional[Sequence[str]] = None, progress: bool = True, total: Optional[int] = None) -> dict:
    """Run the analysis over ``items`` (any iterable, read once); returns the summary dict and, with ``out_dir``,
    writes ``analysis.json``, ``layers.png`` and ``heads.png`` there.

    ``timestep_indices``: indices into the protocol's schedule (default: the protocol's own ``timestep_index``).
    ``head_layer``: layer whose heads are analysed (default: the protocol's first expert layer).
    ``num_classes`` / ``class_names``: the dataset's; given, every item needs ``gt`` and mIoU is computed.
    ``total``: the number of items, for the progress bar."""
    from .segmentation.images import load_image

    _check_options({k: getattr(segmenter.protocol, k) for k in _FIXED_OPTIONS})
    timestep_indices = check_timestep_indices(list(timestep_indices) or [segmenter.protocol.timestep_index],
                                              segmenter.protocol.num_inference_steps)
    head = _resolve_layer(segmenter, segmenter.protocol.layers[0] if head_layer is None else head_layer)
    layers = layer_names(segmenter.transformer)
    source = AllLayersSource(head)
    seg = copy.copy(segmenter)
    seg.attention_source = source
    has_gt = num_classes is not None
    C = num_classes or 0
    conf = {ti: {l: np.zeros((C, C), np.int64) for l in layers} for ti in timestep_indices}
    head_conf: List[np.ndarray] = []
    budget = {ti: {l: np.zeros(4) for l in layers} for ti in timestep_indices}
    norms = {ti: {l: np.zeros(6) for l in layers} for ti in timestep_indices}
    timesteps, mosaic, n_tokens, n_items = {}, None, None, 0
    it = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="analyze", file=sys.stderr, total=total)
    with torch.no_grad():
        for item in it:
            if has_gt and (item.gt is None or item.class_ids is None):
                raise ValueError(f"item {item.id!r} has no ground truth (gt, class_ids), but num_classes was given")
            n_items += 1
            px = load_image(item.image, f"image {item.id!r}")
            geom = seg.geometry(*px.shape[-2:])
            prompt_cols = {pk.prompt: sorted({j for c in pk.columns for j in c}) for pk in item.packs}
            for ti in timestep_indices:
                seg_t = seg._with({"timestep_index": ti})
                source.begin(prompt_cols)
                _, meta = seg_t._i2t_for_image(px, geom, [pk.prompt for pk in item.packs], None, item.id)
                timesteps[ti] = meta["timestep"]
                r = source.result
                n_tokens = (r.n_img, r.n_txt)
                for l in layers:
                    budget[ti][l] += r.budget[l]
                    if l in r.norms:
                        norms[ti][l] += r.norms[l]
                    if has_gt:
                        _, labels = seg_t.labels_from_i2t(torch.cat(r.i2t[l]), geom, item.packs, keep_scores=False)
                        conf[ti][l] += _confusion(labels, item, C)
                if ti == timestep_indices[0]:
                    heads_i2t = torch.cat(r.heads)  # [P, H, N_img, T]
                    H = heads_i2t.shape[1]
                    if has_gt:
                        if not head_conf:
                            head_conf = [np.zeros((C, C), np.int64) for _ in range(H)]
                        for h in range(H):
                            _, labels = seg_t.labels_from_i2t(heads_i2t[:, h], geom, item.packs, keep_scores=False)
                            head_conf[h] += _confusion(labels, item, C)
                    if mosaic is None:  # the first image's class maps: per head of the head layer, head-mean of all
                        mosaic = (_head_maps(heads_i2t, item.packs, geom.grid),
                                  [n for pk in item.packs for n in pk.classes],
                                  {l: _head_maps(torch.cat(r.i2t[l])[:, None], item.packs, geom.grid)[0]
                                   for l in layers})
    if n_items == 0:
        raise ValueError("no images to analyse")
    summary = _summary(layers, timestep_indices, timesteps, budget, norms, conf if has_gt else None,
                       head_conf if has_gt else None, head, class_names, n_tokens, n_items)
    if out_dir is not None:
        from ._io import atomic_write_json

        atomic_write_json(os.path.join(out_dir, "analysis.json"), summary)
        try:
            import matplotlib  # noqa: F401  (an optional dependency: the "plot" extra)
        except ImportError as e:
            from ._optional import is_missing
            if not is_missing(e, "matplotlib"):
                raise  # installed but broken: its own error is the cause to show
            warnings.warn("matplotlib is not installed (pip install 'seg4diff-fast[plot]'): analysis.json is "
                          "written, layers.png and heads.png are not")
            return summary
        plot_layers(summary, os.path.join(out_dir, "layers.png"))
        if mosaic is not None:
            expert = summary["expert_layer"]
            plot_heads(mosaic[0], mosaic[1], summary, os.path.join(out_dir, "heads.png"),
                       expert_maps=mosaic[2][expert] if expert not in (None, head) else None)
    return summary


def _confusion(labels: torch.Tensor, item: AnalysisItem, C: int) -> np.ndarray:
    """``labels`` ``[H, W]`` local class ids (pack order) -> confusion against the item's dataset labels."""
    pred = np.asarray(item.class_ids, dtype=np.int64)[labels.numpy()]
    return confusion_matrix(pred, item.gt, C, ignore_index=item.ignore_index)


def _head_maps(heads_i2t: torch.Tensor, packs: List[PromptColumns], grid) -> np.ndarray:
    """``[P, H, N_img, T]`` -> ``[H + 1, C, h, w]`` class maps (mean of the class's token columns) per head, and
    the head mean last."""
    maps = []
    for k, pk in enumerate(packs):
        for c in pk.columns:
            maps.append(heads_i2t[k][:, :, c].float().mean(-1))  # [H, N_img]
    m = torch.stack(maps, 1)  # [H, C, N_img]
    m = torch.cat([m, m.mean(0, keepdim=True)])
    return m.reshape(m.shape[0], m.shape[1], *grid).cpu().numpy()


def _summary(layers, tis, timesteps, budget, norms, conf, head_conf, head, class_names, n_tokens, n_items) -> dict:
    def ratio(a, b):
        return float(a / b) if b > 0 else None

    n_img, n_txt = n_tokens or (0, 0)
    n = n_img + n_txt
    per_t = []
    for ti in tis:
        entry = {"timestep_index": ti, "timestep": float(timesteps.get(ti, float("nan"))), "layers": {}}
        for l in layers:
            b = budget[ti][l]
            i2t, t2i = ratio(b[0], b[1]), ratio(b[2], b[3])
            d = {"budget": {"i2i": None if i2t is None else 1 - i2t, "i2t": i2t,
                            "t2i": t2i, "t2t": None if t2i is None else 1 - t2i}}
            if i2t is not None and t2i is not None:  # shares of the whole N x N matrix (each row sums to 1)
                d["budget"].update({f"matrix_{k}": v for k, v in zip(
                    KINDS, [n_img * (1 - i2t) / n, n_img * i2t / n, n_txt * t2i / n, n_txt * (1 - t2i) / n])})
            v = norms[ti][l]
            d["value_norm"] = {"image": ratio(v[0], v[1]), "text": ratio(v[2], v[3]), "prompt": ratio(v[4], v[5])}
            if conf is not None:
                s = scores_from_confusion(conf[ti][l], class_names)
                d["mIoU"] = s["mIoU"]
                d["pixel_accuracy"] = s["pixel_accuracy"]
            entry["layers"][l] = d
        per_t.append(entry)
    out = {
        "layers": list(layers),
        "num_images": n_items,
        "tokens": {"image": n_img, "text": n_txt},
        "uniform_budget": {"i2t": n_txt / n if n else None, "t2i": n_img / n if n else None},
        "timesteps": per_t,
        "expert_layer": None,
        "head_layer": head,
    }
    if conf is not None:
        first = per_t[0]["layers"]
        out["expert_layer"] = max(layers, key=lambda l: (not math.isnan(first[l]["mIoU"]), first[l]["mIoU"]))
    if head_conf:
        out["heads"] = {"layer": head, "timestep_index": tis[0],
                        "mIoU": [scores_from_confusion(c, class_names)["mIoU"] for c in head_conf]}
    return out


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    import io

    from ._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_layers(summary: dict, path: str) -> None:
    """Per-layer curves: mIoU (one line per timestep; with ground truth), attention budget and value norms at
    the first timestep; the expert layer marked by a dashed line."""
    plt = _pyplot()
    layers = summary["layers"]
    x = np.arange(len(layers))
    has_miou = summary["expert_layer"] is not None
    panels = (["mIoU"] if has_miou else []) + ["budget", "value norm"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * len(layers) + 2), 3 * len(panels)), sharex=True)
    axes = np.atleast_1d(axes)
    first = summary["timesteps"][0]
    ax_i = 0
    if has_miou:
        ax = axes[ax_i]
        for entry in summary["timesteps"]:
            y = [entry["layers"][l]["mIoU"] for l in layers]
            ax.plot(x, y, marker="o", label=f"t index {entry['timestep_index']} (t={entry['timestep']:.0f})")
        ax.set_ylabel("mIoU (%)")
        ax.legend(fontsize=8)
        ax_i += 1
    ax = axes[ax_i]
    for k, style in zip(KINDS, ["-", "-", "--", "--"]):
        ax.plot(x, [first["layers"][l]["budget"][k] for l in layers], style, marker=".", label=k)
    u = summary["uniform_budget"]
    if u["i2t"] is not None:
        ax.axhline(u["i2t"], color="grey", linestyle=":", label="i2t if uniform")
        ax.axhline(u["t2i"], color="black", linestyle=":", label="t2i if uniform")
    ax.set_ylabel("share of a query's attention")
    ax.legend(fontsize=8, ncol=3)
    ax = axes[ax_i + 1]
    for k in ("image", "text", "prompt"):
        ys = [first["layers"][l]["value_norm"][k] for l in layers]
        ax.plot(x, [np.nan if v is None else v for v in ys], marker=".", label=f"{k} tokens")
    ax.set_ylabel("mean |v| (L2)")
    ax.legend(fontsize=8)
    if summary["expert_layer"] is not None:
        e = layers.index(summary["expert_layer"])
        for a in axes:
            a.axvline(e, color="red", linestyle="--", alpha=0.6)
        axes[0].set_title(f"expert layer: {summary['expert_layer']}")
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([l.replace("transformer_blocks.", "") for l in layers], rotation=90, fontsize=7)
    axes[-1].set_xlabel("layer")
    _save(fig, path)
    plt.close(fig)


def plot_heads(maps: np.ndarray, classes: List[str], summary: dict, path: str,
               expert_maps: Optional[np.ndarray] = None) -> None:
    """Mosaic of the head layer's ``maps`` ``[H + 1, C, h, w]`` (the first image's class maps): a row per head, then
    the head mean, a column per class; with ``expert_maps`` ``[C, h, w]`` (the head mean of the expert layer the
    run found, when it is not the head layer) a last row of those. Each row has its own colour scale and colour
    bar (a head's segmentation is the argmax over its row); row labels give the mIoU of the row's maps alone."""
    plt = _pyplot()
    head, expert = summary["head_layer"], summary["expert_layer"]
    rows = list(maps) + ([] if expert_maps is None else [expert_maps])
    R, C = len(rows), maps.shape[1]
    first = summary["timesteps"][0]["layers"]
    head_miou = summary.get("heads", {}).get("mIoU")
    labels = [f"head {h}" + ("" if head_miou is None else f"\nmIoU {head_miou[h]:.1f}") for h in range(len(maps) - 1)]
    labels += [f"{name}mean" + (f"\nmIoU {first[layer]['mIoU']:.1f}" if "mIoU" in first[layer] else "")
               for name, layer in [("", head)] + ([] if expert_maps is None else [("expert\n", expert)])]
    fig, axes = plt.subplots(R, C, figsize=(1.4 * C + 1.6, 1.2 * R + 0.8), squeeze=False, layout="constrained")
    for r, row in enumerate(rows):
        for c in range(C):
            ax = axes[r, c]
            im = ax.imshow(row[c], cmap="viridis", vmin=float(np.min(row)), vmax=float(np.max(row)))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(classes[c], fontsize=8)
        axes[r, 0].set_ylabel(labels[r], fontsize=7)
        bar = fig.colorbar(im, ax=list(axes[r]), fraction=0.04, pad=0.01)
        bar.ax.tick_params(labelsize=6)
    if expert is None:
        found = "no ground truth: no expert layer found"
    elif expert == head:
        found = f"{head} is the expert layer this run found (highest mIoU)"
    else:
        found = f"last row: {expert}, the expert layer this run found (highest mIoU), head mean"
    fig.suptitle(f"i2t maps of the first image: {head} (head layer) per head, then their mean\n{found}\n"
                 "colour: an image token's attention probability on the class's tokens (their mean); a scale per row",
                 fontsize=8)
    _save(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command line


def cmd_analyze(args) -> int:
    from .segmentation.commands import _build, _family, _overrides, _parse_classes
    from .segmentation.datasets import open_dataset
    from .segmentation.protocol import PROTOCOLS

    try:
        tis = list(args.timestep_indices or ())
        if tis:
            steps = args.num_inference_steps or PROTOCOLS[_family(args)].num_inference_steps
            check_timestep_indices(tis, steps, "--timestep-indices")
            if args.timestep_index is None:  # the protocol's default (-8) need not fit a shorter --steps
                args.timestep_index = tis[0]
        overrides = _overrides(args)
        _check_options(overrides, flags=True)
        head = None
        if args.head_layer is not None:
            if len(args.head_layer) != 1:
                raise ValueError(f"--head-layer: give one layer, got {len(args.head_layer)}")
            head = args.head_layer[0]
        if (args.dataset is None) == (not args.prompt):
            raise ValueError("give either --dataset (with --root) or --prompt (with --classes)")
        ds = classes = None
        if args.dataset is not None:
            if not args.root:
                raise ValueError("--dataset needs --root")
            ds = open_dataset(args.dataset, args.root, args.split, args.limit)
            if len(ds) == 0:
                raise ValueError(f"no samples found for {args.dataset} under {args.root}")
        else:
            classes = _parse_classes(args)
            if classes is None:
                raise ValueError("--prompt needs --classes (each named in every prompt)")
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"seg4diff-fast analyze: error: {e}", file=sys.stderr)
        return 2
    try:
        seg = _build(args, overrides)
        if ds is not None:
            summary = analyze(seg, dataset_items(seg, ds, args.protocol), args.out, timestep_indices=tis,
                              head_layer=head, num_classes=len(ds.classes), class_names=ds.classes, total=len(ds))
        else:
            items = generated_items(seg, args.prompt, classes, num_inference_steps=args.gen_steps)
            summary = analyze(seg, items, args.out, timestep_indices=tis, head_layer=head)
    except (RuntimeError, ValueError) as e:
        print(f"seg4diff-fast analyze: error: {e}", file=sys.stderr)
        return 1
    expert = summary["expert_layer"]
    print(f"analysed {summary['num_images']} images, {len(summary['layers'])} layers"
          + (f"; expert layer {expert} (mIoU {summary['timesteps'][0]['layers'][expert]['mIoU']:.1f})" if expert else "")
          + f" -> {os.path.join(args.out, 'analysis.json')}")
    return 0


def register_commands(subparsers) -> None:
    """Add ``analyze``."""
    from .cli import integer, integer_list
    from .segmentation.commands import _model_args
    from .segmentation.datasets import DATASETS

    p = subparsers.add_parser(
        "analyze", help="find the grounding expert: per-layer attention budget, value norms, mIoU, per-head maps",
        description="The Seg4Diff layer analysis over a dataset (--dataset/--root, ground truth: per-layer mIoU) or "
                    "over images generated from --prompt (no mIoU). One forward per image and timestep with every "
                    "layer captured. Writes OUT/analysis.json, OUT/layers.png, OUT/heads.png.")
    p.add_argument("--dataset", choices=sorted(DATASETS))
    p.add_argument("--root", help="dataset folder in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=integer(1), help="first N samples only")
    p.add_argument("--protocol", choices=["gt", "full"], default="gt",
                   help="classes prompted: present in the ground truth (the paper's) or all of the dataset")
    p.add_argument("--prompt", action="append", help="generate an image from this prompt and analyse it (repeatable)")
    p.add_argument("--classes", help="with --prompt: comma-separated names, each occurring in every prompt")
    p.add_argument("--gen-steps", type=integer(1), help="denoising steps for --prompt (default 28)")
    p.add_argument("--timestep-indices", type=integer_list(what="indices into the schedule"),
                   help="comma-separated indices into the schedule, each timestep once (default: --timestep-index, -8)")
    p.add_argument("--head-layer", type=integer_list(lo=0, names=True, what="a layer index or module name"),
                   help="layer whose heads are analysed (default: the expert layer of --layers)")
    p.add_argument("--out", default="seg4diff_analysis", help="output folder (default: %(default)s)")
    _model_args(p)
    p.set_defaults(func=cmd_analyze, classes_file=None)
