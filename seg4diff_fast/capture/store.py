"""``AttentionStore``: where captured text-image attention maps go, aggregated over denoising steps.

A store is filled by the capture processors that :func:`seg4diff_fast.capture.register` installs. One
transformer forward is one step for every captured layer (each captured layer runs once per forward). A
forward the batch policy leaves out (the unconditional pass of Flux's true CFG, SD3's skip-layer-guidance
pass) is not a step.

Per layer the store keeps, for ``capture="i2t"`` (``"t2i"`` alike, ``"both"`` keeps both):

- ``steps="mean"``: a float32 running mean ``[B', (H,) N_img, T]``. Its memory does not grow with the number
  of steps.
- ``steps="all"``: every step, in ``map_dtype``, stacked on read as ``[S, B', (H,) N_img, T]``.
- ``steps={i, j, ...}``: only those step indices (0-based, counted per layer), stacked like ``"all"``. These
  two modes count steps with a Python int; the maps reach the store through a custom op that runs outside
  the compiled graph, so ``torch.compile`` does not recompile per step with them either (a set of steps: two
  graphs, one with maps and one without, see :class:`_NextStep`).

A step of another size than the steps held (maps of another shape; an integer grid that differs) is refused when
recorded. Reading the maps refuses maps that hold NaN or inf (``FloatingPointError``, naming the layer and step where
they first appear: one reduction per recorded map on its device, read when the maps are read), and, for a set of
steps, a store that saw a second generation (the timesteps came back towards the first one) or in which none of
the steps occurred (a warning when only some did not).

``B'`` is the batch kept by ``batch``: ``"cond"`` (the conditional half under SD3's batched CFG; the whole
batch otherwise), ``"all"``, or explicit row indices of the transformer batch.
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .._io import atomic_write_bytes
from ..attention import BACKENDS, CAPTURES, HEADS, NORMALIZATIONS, _check_full_map

__all__ = ["AttentionStore"]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_CAPTURES = tuple(c for c in CAPTURES if c is not None)  # a store captures something
_KINDS = ("i2t", "t2i")


def _all_finite(m: torch.Tensor) -> torch.Tensor:
    """0-d bool on ``m``'s device: whether ``m`` holds no NaN or inf. One float32 sum (NaN or inf anywhere makes it
    non-finite; maps of probabilities or scores cannot overflow it), no temporary of the maps' size."""
    return torch.isfinite(m.sum(dtype=torch.float32))


def _check_steps(steps) -> Union[str, frozenset]:
    if steps in ("mean", "all"):
        return steps
    if isinstance(steps, (set, frozenset, list, tuple, range)):
        steps = list(steps)
        if steps and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
            return frozenset(steps)
    raise ValueError(f"steps must be 'mean', 'all' or a non-empty set of step indices >= 0, got {steps!r}")


def _check_text_index(text_index) -> Optional[torch.Tensor]:
    """``None`` or a 1-D int64 CPU tensor of non-negative text positions, from a sequence of ints or an integer
    tensor / array. Floats, bools, nested lists, negative values and empty selections are refused (nothing is
    rounded or flattened); the upper bound is the text length, checked at the first forward."""
    if text_index is None:
        return None
    if isinstance(text_index, (str, bytes)) or not hasattr(text_index, "__len__"):
        raise TypeError(
            f"text_index must be a 1-D sequence of int text positions (list, tuple, range, integer tensor), got "
            f"{type(text_index).__name__}"
        )
    if isinstance(text_index, (list, tuple, range)):
        for i in text_index:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(
                    f"text_index must hold ints (positions inside the text block), got {i!r} of type "
                    f"{type(i).__name__} in {list(text_index)!r}"
                )
        index = torch.tensor([int(i) for i in text_index], dtype=torch.long)
    else:
        try:
            index = torch.as_tensor(text_index)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"text_index must be a 1-D sequence of ints, got {type(text_index).__name__}: {e}"
            ) from None
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"text_index must have an integer dtype, got {index.dtype}")
        index = index.to(device="cpu", dtype=torch.long)
    if index.dim() != 1:
        raise ValueError(f"text_index must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() == 0:
        raise ValueError("text_index must select at least one text column, got an empty selection")
    if int(index.min()) < 0:
        raise ValueError(f"text_index positions must be >= 0 (inside the text block), got {index.tolist()}")
    return index


def _check_batch(batch) -> Union[str, Tuple[int, ...]]:
    if batch in ("cond", "all"):
        return batch
    if isinstance(batch, (list, tuple, range)):
        batch = tuple(batch)
        if batch and all(isinstance(b, int) and not isinstance(b, bool) for b in batch):
            return batch
    raise ValueError(f"batch must be 'cond', 'all' or a non-empty sequence of batch indices, got {batch!r}")


class AttentionStore:
    """Captured text-image attention of the registered layers, aggregated as asked.

    Args:
        capture: ``"i2t"`` (image queries x text keys), ``"t2i"`` (text queries x image keys) or ``"both"``.
        heads: ``"mean"`` averages over heads (in the kernel, in float32), ``"all"`` keeps the head axis.
        text_index: optional text columns to keep (positions inside the model's text block), e.g.
            ``range(77)`` for SD3's CLIP part: a 1-D sequence of non-negative ints (list, tuple, range, integer
            tensor or array; repeats allowed). ``None`` keeps the whole text block. Positions past the text length
            are refused at the first forward, before anything runs.
        map_dtype: dtype the kernel writes the maps in (float16, bfloat16 or float32).
        steps: ``"mean"``, ``"all"`` or a set of step indices (see the module docstring).
        batch: ``"cond"``, ``"all"`` or explicit indices of the transformer batch.
        backend: passed to :func:`seg4diff_fast.attention.joint_attention` (``"auto"``, ``"triton"``,
            ``"triton-split"``, ``"sdpa"``, ``"torch"``, ``"reference"``, ``"full-map"``: Seg4Diff's own path, for
            benchmarks, which computes only ``capture="i2t"``, ``heads="mean"``, ``normalize="joint"`` without
            ``text_index``).
        normalize: passed to :func:`~seg4diff_fast.attention.joint_attention`: ``"joint"`` (the model's softmax over
            all keys), ``"text"`` (softmax over the kept text columns only), ``"logits"`` (the scaled scores
            ``q k^T * scale``); every backend but ``"full-map"`` computes all three.

    Read ``maps`` (``{layer: tensor}``; the i2t maps unless ``capture="t2i"``), ``i2t``/``t2i`` (each kind),
    ``grid`` (``{layer: (h, w)}``, video ``(frames, h, w)``), ``steps_seen`` (``{layer: int}``), ``timesteps``
    (``{layer: [float]}``), ``text_len`` (``{layer: T}``).
    """

    def __init__(
        self,
        capture: str = "i2t",
        heads: str = "mean",
        text_index: Optional[Union[Sequence[int], torch.Tensor]] = None,
        map_dtype: torch.dtype = torch.float16,
        steps: Union[str, Iterable[int]] = "mean",
        batch: Union[str, Sequence[int]] = "cond",
        backend: str = "auto",
        normalize: str = "joint",
    ):
        if capture not in _CAPTURES:
            raise ValueError(f"capture must be one of {_CAPTURES}, got {capture!r}")
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if map_dtype not in _DTYPE_NAMES:
            raise ValueError(f"map_dtype must be one of {list(_DTYPE_NAMES)}, got {map_dtype!r}")
        self.capture = capture
        self.heads = heads
        self.text_index = _check_text_index(text_index)  # [T] int64 on the CPU, or None
        # its largest position, a Python int: the forward pre-hook checks it without reading a tensor
        self._text_index_max = None if self.text_index is None else int(self.text_index.max())
        if backend == "full-map":  # Seg4Diff's own path computes one mode only: refused here, before any forward
            _check_full_map(capture, heads, normalize, self.text_index, None)
        self.map_dtype = map_dtype
        self.steps = _check_steps(steps)
        self.batch = _check_batch(batch)
        self.backend = backend
        self.normalize = normalize
        self.model_class: Optional[str] = None
        self._text_index_on: Dict[torch.device, torch.Tensor] = {}
        # layer -> whether its next step is kept; one object per layer for the store's life (reset() updates it
        # in place), held by the layer's capture site: see _NextStep
        self._next_steps: Dict[str, _NextStep] = {}
        self.reset()

    # ------------------------------------------------------------------ filling (called by the processors)

    def reset(self) -> None:
        """Forget every captured map (keeps the options and the registration)."""
        self._mean: Dict[Tuple[str, str], torch.Tensor] = {}  # (kind, layer) -> float32 running mean
        self._count: Dict[Tuple[str, str], torch.Tensor] = {}  # (kind, layer) -> float32 0-d step count
        self._kept: Dict[Tuple[str, str], List[torch.Tensor]] = {}  # (kind, layer) -> per-step maps
        self._kept_steps: Dict[str, List[int]] = {}  # layer -> step indices kept
        self._calls: Dict[str, int] = {}  # layer -> steps seen (Python count, "all"/set modes)
        self._grid: Dict[str, object] = {}  # layer -> (h, w) or a zero-argument callable giving it
        # layer -> the forward's timestep argument per kept step (a [capacity] buffer for steps="mean")
        self._timesteps: Dict[str, object] = {}
        # (kind, layer) -> 0-d int64 on the maps' device: the first step whose maps held NaN or inf, -1 while none
        # did (one reduction per recorded map, read when the maps are read: no host sync per step)
        self._nonfinite: Dict[Tuple[str, str], torch.Tensor] = {}
        # set of steps: layer -> [first timestep, distance of the last one from it, step at which the timesteps went
        # back (-1: never)], [1] float32 tensors on the timestep's device (see _note_timestep)
        self._went_back: Dict[str, List[torch.Tensor]] = {}
        self._grid_changed: Dict[str, torch.Tensor] = {}  # layer -> 0-d bool: the position ids changed between steps
        self._loaded: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        self._loaded_meta: Optional[dict] = None
        for flag in self._next_steps.values():
            flag.kept = self._kept_at(0)

    def _kept_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based, of one layer) is kept: always for ``"mean"`` / ``"all"``."""
        return isinstance(self.steps, str) or step in self.steps

    def _next_step(self, layer: str) -> "_NextStep":
        """The flag saying whether ``layer``'s next step is kept (made at ``register``, kept up to date by
        :meth:`_record` and :meth:`reset`)."""
        flag = self._next_steps.get(layer)
        if flag is None:
            flag = self._next_steps[layer] = _NextStep(self._kept_at(self._calls.get(layer, 0)))
        return flag

    @property
    def loaded(self) -> bool:
        """Whether this store was read from a file (:meth:`load`): read-only, it cannot be registered."""
        return self._loaded is not None

    def _text_index(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.text_index is None:
            return None
        if torch.compiler.is_compiling():
            # in a compiled graph: no cache, whose filling after the first call would make dynamo recompile
            return self.text_index.to(device)
        if device not in self._text_index_on:
            self._text_index_on[device] = self.text_index.to(device)
        return self._text_index_on[device]

    def _record(self, layer: str, maps: Dict[str, torch.Tensor], grid, timestep: Optional[torch.Tensor] = None) -> None:
        """Aggregate one step of ``layer``: ``maps`` is ``{"i2t": [B', (H,) N_img, T], "t2i": ...}`` (the batch
        rows already selected); ``grid`` is ``(h, w)`` (``(frames, h, w)`` for video), a callable giving it, or
        ``None``; ``timestep``: the forward's timestep argument (``[B]`` tensor or number) or ``None``, kept (as
        given: no device sync) for every step kept."""
        if self._loaded is not None:
            raise RuntimeError("this store was loaded from a file; create a new AttentionStore to capture")
        step = self._calls.get(layer, 0)  # "all" / a set of steps
        # a step the store keeps is checked before anything changes, and its grid is the store's (a step not kept may
        # be of another size: gradient checkpointing computes its maps, which are dropped)
        if self.steps == "mean" or self._kept_at(step):
            self._check_size(layer, maps, grid)
            if grid is not None:
                self._grid[layer] = grid
        if self.steps == "mean":
            for kind, m in maps.items():
                key = (kind, layer)
                mean = self._mean.get(key)
                if mean is None:
                    mean = self._mean[key] = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                    self._count[key] = torch.zeros((), dtype=torch.float32, device=m.device)
                count = self._count[key]
                count.add_(1.0)
                self._note_finite(key, m, count - 1)
                mean.add_((m.float() - mean) / count)  # running mean: memory does not grow with steps
            if timestep is not None:
                self._record_timestep_mean(layer, timestep, count)
            return
        self._calls[layer] = step + 1
        if layer in self._next_steps:  # at run time, outside any graph: the next call's guard reads it
            self._next_steps[layer].kept = self._kept_at(step + 1)
        if self.steps != "all":
            self._note_timestep(layer, step, timestep)
            if step not in self.steps:
                return
        self._kept_steps.setdefault(layer, []).append(step)
        if timestep is not None:
            self._timesteps.setdefault(layer, []).append(timestep)
        for kind, m in maps.items():
            self._note_finite((kind, layer), m, step)
            self._kept.setdefault((kind, layer), []).append(m)

    def _check_size(self, layer: str, maps: Dict[str, torch.Tensor], grid) -> None:
        """Refuse a step of another size than the steps the store holds for ``layer`` (any ``steps`` mode: here, not
        as a torch.stack error on read): maps of another shape, or a grid (as ints) that differs, since maps of a
        4x6 and a 6x4 grid have the same size and would mix silently. (A grid read from position ids is computed
        when read: the ids of the step and of the step before are compared on the device, into a flag read with the
        maps, :meth:`_check_grids`.)"""
        for kind, m in maps.items():
            kept = self._kept.get((kind, layer))
            held = self._mean.get((kind, layer)) if self.steps == "mean" else (kept[0] if kept else None)
            if held is not None and held.shape != m.shape:
                raise ValueError(
                    f"layer {layer!r}: a {kind} map of shape {tuple(m.shape)} cannot join the maps of shape "
                    f"{tuple(held.shape)} this store holds (another resolution, prompt length or batch?); call "
                    "store.reset() (or use a new AttentionStore) between runs of different sizes"
                )
        old = self._grid.get(layer)
        ids = [getattr(g, "ids", None) for g in (old, grid)]
        if ids[0] is not None and ids[1] is not None:
            a, b = (i[0] if i.ndim == 3 else i for i in ids)  # [N_img, C]; of other lengths: the maps' size says it
            if a.shape == b.shape:
                changed = self._grid_changed.get(layer)
                if changed is None:
                    changed = self._grid_changed[layer] = torch.zeros((), dtype=torch.bool, device=b.device)
                changed |= (a.to(b.device, b.dtype) != b).any()
        elif not (old is None or grid is None or callable(old) or callable(grid) or tuple(old) == tuple(grid)):
            raise ValueError(
                f"layer {layer!r}: this step's image grid {tuple(grid)} differs from the grid {tuple(old)} of the "
                "steps this store holds; call store.reset() (or use a new AttentionStore) between runs of different "
                "sizes"
            )

    def _note_finite(self, key: Tuple[str, str], m: torch.Tensor, step) -> None:
        """Remember the first step (``step``: an int, or a 0-d tensor) whose map ``m`` holds NaN or inf: one
        reduction on the maps' device, read by :meth:`_check_finite` when the maps are read (no sync here)."""
        first = self._nonfinite.get(key)
        if first is None:
            first = self._nonfinite[key] = torch.full((), -1, dtype=torch.long, device=m.device)
        bad = ~_all_finite(m)
        step = step if isinstance(step, int) else step.long()  # an int stays a scalar: no host-to-device copy
        first.copy_(torch.where(bad & (first < 0), step, first))

    def _note_timestep(self, layer: str, step: int, timestep) -> None:
        """A set of steps counts steps from the first forward the store saw; a second generation (pipeline call)
        would count on, and keep the first one's maps. A generation's timesteps move away from its first one
        (down for SD3 / Flux, up where time runs from 0 to 1); the first step at which they come closer to it
        again is a new generation: remembered on the timestep's device (no sync), refused by
        :meth:`_check_steps` when the maps are read."""
        if timestep is None:
            return
        t = torch.as_tensor(timestep).reshape(-1)[:1].float()  # [1], first batch row
        state = self._went_back.get(layer)
        if state is None:
            self._went_back[layer] = [t.clone(), torch.zeros_like(t), torch.full_like(t, -1.0)]
            return
        first, last, back = state
        distance = (t - first).abs()
        back.copy_(torch.where((distance < last) & (back < 0), float(step), back))
        state[1] = distance

    _TIMESTEP_CAPACITY = 4096  # steps="mean": timesteps kept per layer (a fixed buffer: no recompile per step)

    def _record_timestep_mean(self, layer: str, timestep, count: torch.Tensor) -> None:
        """Write this step's timestep at index ``count - 1`` of a fixed ``[capacity]`` float32 buffer: tensor
        arithmetic only, so ``torch.compile`` neither breaks the graph nor recompiles per step (a growing list
        would). Steps past the capacity overwrite the last slot; reading them raises."""
        t = torch.as_tensor(timestep, device=count.device).reshape(-1)[:1].float()  # [1], first batch row
        buf = self._timesteps.get(layer)
        if buf is None:
            buf = self._timesteps[layer] = torch.full((self._TIMESTEP_CAPACITY,), float("nan"), device=count.device)
        index = (count - 1).long().clamp(max=self._TIMESTEP_CAPACITY - 1).reshape(1)
        buf.index_copy_(0, index, t)

    # ------------------------------------------------------------------ reading

    def _kind(self, kind: str) -> Dict[str, torch.Tensor]:
        if self._loaded is not None:
            return dict(self._loaded.get(kind, {}))
        self._check_steps()
        self._check_grids()
        self._check_finite()
        if self.steps == "mean":
            maps = {layer: m for (k, layer), m in self._mean.items() if k == kind}
        else:
            maps = {layer: torch.stack(ms) for (k, layer), ms in self._kept.items() if k == kind}
        return {layer: self._generated_rows(kind, layer, m) for layer, m in maps.items()}

    def _check_steps(self) -> None:
        """A set of steps: refuse maps of a store that saw a second generation (:meth:`_note_timestep`) or in
        which none of the steps asked for occurred; warn about the steps that did not occur."""
        if isinstance(self.steps, str):
            return
        for layer, (_, _, back) in self._went_back.items():
            k = int(back.item())
            if k >= 0:
                raise RuntimeError(
                    f"layer {layer!r}: the timesteps went back at its step {k} ({self._calls[layer]} steps seen): this "
                    f"store saw a second generation, and steps={sorted(self.steps)} counts steps from the first "
                    "forward it recorded, so its maps would be the first generation's. Call store.reset() (or use a "
                    "new AttentionStore) before each pipeline call"
                )
        for layer, seen in self._calls.items():
            missing = sorted(s for s in self.steps if s >= seen)
            if len(missing) == len(self.steps):
                raise ValueError(
                    f"layer {layer!r} ran {seen} steps (0..{seen - 1}): none of steps={sorted(self.steps)} occurred, "
                    "so there are no maps; steps are 0-based indices of the transformer forwards of one generation"
                )
            if missing:
                warnings.warn(
                    f"layer {layer!r} ran {seen} steps (0..{seen - 1}): steps {missing} of steps={sorted(self.steps)} "
                    "never occurred; the maps hold the others"
                )

    def _check_grids(self) -> None:
        """Refuse maps of steps whose image position ids differ (the same token count on another grid: see
        :meth:`_check_size`). One device read per layer."""
        for layer, changed in self._grid_changed.items():
            if bool(changed):
                raise ValueError(
                    f"layer {layer!r}: the image position ids (img_ids) differ between the steps this store holds: the "
                    "same number of image tokens on another grid, whose maps would mix under one grid; call "
                    "store.reset() (or use a new AttentionStore) between runs of different sizes"
                )

    def _check_finite(self) -> None:
        """Refuse maps that hold NaN or inf, naming the layer and step where they first appear (in forward order:
        the earliest step, then the first layer recorded at it). One device read per recorded map."""
        first = None  # (step, layer, kind)
        for (kind, layer), step in self._nonfinite.items():
            k = int(step.item())
            if k >= 0 and (first is None or k < first[0]):
                first = (k, layer, kind)
        if first is None:
            return
        k, layer, kind = first
        at = self._timestep_at(layer, k)
        raise FloatingPointError(
            f"the captured {kind} maps of layer {layer!r} hold NaN or inf from its step {k}"
            f"{'' if at is None else f' (timestep {at:g})'} on: the model's attention there was not finite (float16 "
            "overflow, e.g. Flux in float16: run in bfloat16 or float32; or non-finite inputs: latents, a guidance "
            "scale so large that the latents overflow, weights)"
        )

    def _timestep_at(self, layer: str, step: int) -> Optional[float]:
        """The timestep of ``layer``'s step ``step`` if the store kept it, else None."""
        try:
            if self.steps == "mean":
                return float(self._timesteps[layer][step]) if step < self._TIMESTEP_CAPACITY else None
            t = self._timesteps[layer][self._kept_steps[layer].index(step)]
            return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        except (KeyError, ValueError, IndexError):
            return None

    def _generated_rows(self, kind: str, layer: str, m: torch.Tensor) -> torch.Tensor:
        """The image tokens of the generated image only: with reference images (Flux.1 Kontext, Flux.2) the
        image part of the sequence is ``[generated, references]`` and the grid is the generated image's, so
        its first ``prod(grid)`` tokens are kept (image axis: -2 for i2t, -1 for t2i)."""
        grid = self._grid.get(layer)
        if grid is None:
            return m
        n = 1
        for g in grid() if callable(grid) else grid:
            n *= int(g)
        axis = m.ndim - 2 if kind == "i2t" else m.ndim - 1
        if n > m.shape[axis]:
            raise ValueError(
                f"layer {layer!r}: the image grid {tuple(grid() if callable(grid) else grid)} has {n} tokens but the "
                f"maps have {m.shape[axis]} image rows"
            )
        return m.narrow(axis, 0, n)

    @property
    def i2t(self) -> Dict[str, torch.Tensor]:
        """``{layer: [(S,) B', (H,) N_img, T]}``, image queries x text keys (empty unless captured)."""
        return self._kind("i2t")

    @property
    def t2i(self) -> Dict[str, torch.Tensor]:
        """``{layer: [(S,) B', (H,) T, N_img]}``, text queries x image keys (empty unless captured)."""
        return self._kind("t2i")

    @property
    def maps(self) -> Dict[str, torch.Tensor]:
        """The i2t maps (the t2i maps when ``capture="t2i"``): float32 running means for ``steps="mean"``,
        ``map_dtype`` stacks over the kept steps otherwise."""
        return self.t2i if self.capture == "t2i" else self.i2t

    @property
    def grid(self) -> Dict[str, Tuple[int, int]]:
        """``{layer: (h, w)}``: the image-token grid, so that ``N_img`` reshapes row-major to ``[h, w]``."""
        if self._loaded_meta is not None:
            return {k: tuple(v) for k, v in self._loaded_meta["grid"].items()}
        return {layer: tuple(g() if callable(g) else g) for layer, g in self._grid.items()}

    @property
    def steps_seen(self) -> Dict[str, int]:
        """``{layer: number of steps recorded}`` (for a set of steps: steps seen, kept or not)."""
        if self._loaded_meta is not None:
            return dict(self._loaded_meta["steps_seen"])
        if self.steps == "mean":
            return {layer: int(c.item()) for (kind, layer), c in self._count.items() if kind == self._first_kind}
        return dict(self._calls)

    @property
    def kept_steps(self) -> Dict[str, List[int]]:
        """``{layer: [step indices kept]}`` for ``steps="all"`` or a set (empty for ``"mean"``)."""
        if self._loaded_meta is not None:
            return {k: list(v) for k, v in self._loaded_meta["kept_steps"].items()}
        return {layer: list(s) for layer, s in self._kept_steps.items()}

    @property
    def timesteps(self) -> Dict[str, List[float]]:
        """``{layer: [timestep of each kept step]}``: the ``timestep`` the transformer was called with (first
        batch row, in the pipeline's units: SD3 0..1000, Flux ``t / 1000``), for every step in the maps
        (``steps="mean"``: every step averaged)."""
        if self._loaded_meta is not None:
            return {k: list(v) for k, v in self._loaded_meta.get("timesteps", {}).items()}
        if self.steps == "mean":
            seen = self.steps_seen
            out = {}
            for layer, buf in self._timesteps.items():
                if seen[layer] > self._TIMESTEP_CAPACITY:
                    raise RuntimeError(
                        f"layer {layer!r}: {seen[layer]} steps averaged, but a steps='mean' store keeps the timesteps "
                        f"of the first {self._TIMESTEP_CAPACITY} only"
                    )
                out[layer] = buf[: seen[layer]].cpu().tolist()
            return out
        first = lambda t: float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)  # noqa: E731
        return {layer: [first(t) for t in ts] for layer, ts in self._timesteps.items()}

    @property
    def text_len(self) -> Dict[str, int]:
        """``{layer: T}``: number of text columns of the maps."""
        if self.capture == "t2i":
            return {layer: m.shape[-2] for layer, m in self.t2i.items()}
        return {layer: m.shape[-1] for layer, m in self.i2t.items()}

    @property
    def _first_kind(self) -> str:
        return "t2i" if self.capture == "t2i" else "i2t"

    def _layers(self) -> List[str]:
        """The layers with maps, sorted, without reading (or checking) the maps."""
        if self._loaded is not None:
            return sorted(self._loaded.get(self._first_kind, {}))
        return sorted({layer for kind, layer in (self._mean if self.steps == "mean" else self._kept)
                       if kind == self._first_kind})

    def __repr__(self) -> str:
        return (
            f"AttentionStore(capture={self.capture!r}, heads={self.heads!r}, steps={self._steps_json()!r}, "
            f"batch={self.batch!r}, layers={self._layers()})"
        )

    # ------------------------------------------------------------------ files

    def _steps_json(self):
        return self.steps if isinstance(self.steps, str) else sorted(self.steps)

    def save(self, path: str) -> None:
        """Write the maps to a safetensors file: tensors ``"i2t/<layer>"`` / ``"t2i/<layer>"``, and metadata
        (model class, layers, steps seen and kept, grid, text length, dtype, capture options) as JSON under
        the metadata key ``"seg4diff_fast"``."""
        from safetensors.torch import save

        tensors = {}
        for kind in _KINDS:
            for layer, m in self._kind(kind).items():
                tensors[f"{kind}/{layer}"] = m.detach().to("cpu").contiguous()
        meta = {
            "format": _FORMAT,
            "model_class": self.model_class,
            "layers": sorted(self.maps),
            "capture": self.capture,
            "heads": self.heads,
            "normalize": self.normalize,
            "text_index": None if self.text_index is None else self.text_index.tolist(),
            "map_dtype": _DTYPE_NAMES[self.map_dtype],
            "steps": self._steps_json(),
            "batch": self.batch if isinstance(self.batch, str) else list(self.batch),
            "steps_seen": self.steps_seen,
            "kept_steps": self.kept_steps,
            "grid": {k: list(v) for k, v in self.grid.items()},
            "timesteps": self.timesteps,
            "text_len": self.text_len,
            "tensor_dtype": {name: str(t.dtype).replace("torch.", "") for name, t in tensors.items()},
        }
        atomic_write_bytes(path, save(tensors, metadata={"seg4diff_fast": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device] = "cpu") -> "AttentionStore":
        """Read a file written by :meth:`save`; the returned store is read-only (``maps``, ``grid``, ...) and
        cannot be registered. A file that is missing, a folder, not safetensors, or without valid seg4diff_fast
        metadata and tensors raises an error that says which."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{path} is a folder; AttentionStore.load reads a .safetensors file written by save()"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path}")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                raw = (f.metadata() or {}).get("seg4diff_fast")
                if raw is None:
                    raise ValueError(f"{path} has no seg4diff_fast metadata: not written by AttentionStore.save")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        meta = _check_meta(path, raw)
        try:
            store = cls(
                capture=meta["capture"], heads=meta["heads"], text_index=meta["text_index"],
                map_dtype=_DTYPES_BY_NAME[meta["map_dtype"]], steps=meta["steps"], batch=meta["batch"],
                normalize=meta.get("normalize", "joint"),  # files written before the option: joint maps
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad seg4diff_fast metadata: {e}") from None
        store.model_class = meta["model_class"]
        store._loaded = {kind: {} for kind in _KINDS}
        for name, t in tensors.items():
            kind, _, layer = name.partition("/")
            if kind not in _KINDS or not layer:
                raise ValueError(f"{path}: tensor {name!r} is not a map (expected 'i2t/<layer>' or 't2i/<layer>')")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a floating-point map")
            if not bool(_all_finite(t)):  # save() refuses such maps; a file written otherwise
                raise ValueError(f"{path}: tensor {name!r} holds NaN or inf")
            store._loaded[kind][layer] = t
        missing = [layer for layer in meta["layers"] if layer not in store._loaded[store._first_kind]]
        if missing:
            raise ValueError(f"{path}: the metadata lists layers {missing} that have no {store._first_kind} tensor")
        store._loaded_meta = meta
        return store


class _NextStep:
    """Whether the next step of one captured layer is kept (``kept``, a Python bool).

    The capture site reads it to choose between the fused kernel (maps) and the layer's own attention (no maps).
    Under ``torch.compile`` the compiled graph reads it at trace time and dynamo guards on its value, so a
    captured region has two graphs, one per value, and the guard picks the right one at each call: one recompile
    the first time the kind of step changes, not one per step (the step count itself is never read by a graph).
    ``record_maps`` updates it at run time, after it counted the step, per layer: after a graph break between
    two captured layers, the second one's guard sees its own flag, not the first one's update. A plain object
    per layer (not a dict entry, not the count): nothing else the graph reads changes with the steps."""

    def __init__(self, kept: bool):
        self.kept = kept


_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
_FORMAT = "seg4diff_fast.AttentionStore/1"
# metadata key -> JSON type(s) it must have
_META_KEYS = {
    "format": str, "model_class": (str, type(None)), "layers": list, "capture": str, "heads": str,
    "text_index": (list, type(None)), "map_dtype": str, "steps": (str, list), "batch": (str, list),
    "steps_seen": dict, "kept_steps": dict, "grid": dict,
}


def _check_meta(path: str, raw: str) -> dict:
    """The parsed seg4diff_fast metadata of ``path``, or a ValueError that says what is wrong with it."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the seg4diff_fast metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the seg4diff_fast metadata must be a JSON object, got {type(meta).__name__}")
    missing = sorted(k for k in _META_KEYS if k not in meta)
    if missing:
        raise ValueError(f"{path}: the seg4diff_fast metadata lacks {missing}: not written by AttentionStore.save")
    if meta["format"] != _FORMAT:
        raise ValueError(f"{path}: unknown format {meta['format']!r}; this version reads {_FORMAT!r}")
    for key, kinds in _META_KEYS.items():
        if not isinstance(meta[key], kinds):
            raise ValueError(f"{path}: metadata {key!r} has the wrong type ({type(meta[key]).__name__}): {meta[key]!r}")
    if not isinstance(meta.get("timesteps", {}), dict):  # optional: files written before timesteps were kept
        raise ValueError(f"{path}: metadata 'timesteps' has the wrong type ({type(meta['timesteps']).__name__})")
    if meta["map_dtype"] not in _DTYPES_BY_NAME:
        raise ValueError(
            f"{path}: unknown map_dtype {meta['map_dtype']!r} in the metadata; expected one of "
            f"{sorted(_DTYPES_BY_NAME)}"
        )
    return meta
