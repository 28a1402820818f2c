"""What every model family shares: the per-forward context and the capture site of one layer.

A family's record (``families/``) knows its transformer class, the names of its attention layers, where the text
sits in the joint sequence and the image grid (SD3's also how its processor projects/norms q, k, v; the others are
intercepted at their attention call, ``dispatch.py``). Everything else (the store, the batch and step policy, the
kernel call) is here, once.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..attention import joint_attention

__all__ = ["ForwardContext", "CaptureSite", "LayerSpec", "SKIP"]

SKIP = "skip"  # ForwardContext.rows value: this forward is not a step (e.g. Flux's unconditional pass)


# Added to every int a ForwardContext holds in a shape (see there).
_SIZE_OFFSET = 1 << 20


class ForwardContext:
    """What the transformer's forward pre-hook learns about the current forward, for the processors.

    text_len: text tokens of the joint sequence (``encoder_hidden_states.shape[1]``); single-stream
        processors are never told it by diffusers. grid: the image-token grid as ints (``(h, w)``, video
        ``(frames, h, w)``), or Flux-style position ids ``[N_img, C]`` (or ``[B, N_img, C]``) from which the store
        computes ``(h, w)`` when read (no device sync during the forward; see :func:`ids_grid`). Both cross the
        ``record_maps`` custom op, which takes no Python callables.
    rows: batch rows to record: ``None`` (all), a ``slice``/tuple of indices, or ``SKIP``.
    timestep: the forward's ``timestep`` argument as given (``[B]`` tensor or number), or ``None``.
    pass_tensors: under torch.compile with ``batch="cond"``, the forward's ``[latents, conditioning]``
        (:func:`_second_pass_at_run_time`).

    The ints (text length, grid) are held as the shapes of empty tensors ``[_SIZE_OFFSET + int, 0]`` and read
    back from it: a compiled block reads the context as data of another frame than the pre-hook's (the pre-hook
    runs eagerly under ``compile_repeated_blocks`` and ``torch.compile(transformer)``, see
    :func:`eager_when_called_by_torch`), and dynamo guards on the value of an int it reads there, but keeps a
    tensor's sizes symbolic under dynamic shapes: one graph for every resolution and text length, not one per value.
    Each int is held as ``_SIZE_OFFSET + value``: dynamo's duck sizing gives input sizes of equal value one symbol,
    so a grid height equal to a size the blocks specialise (JoyImage's RoPE dimension) would be specialised with it
    and recompile per resolution; no real size is ever ``2**20`` more than another.
    """

    def __init__(self, text_len: Optional[int] = None, grid: Union[None, Sequence[int], torch.Tensor] = None,
                 rows: Union[None, str, slice, Tuple[int, ...]] = None,
                 timestep: Union[None, float, torch.Tensor] = None,
                 pass_tensors: Optional[List[torch.Tensor]] = None):
        self.rows = rows
        self.timestep = timestep
        self.pass_tensors = pass_tensors
        self._ids = grid if isinstance(grid, torch.Tensor) else None
        grid_ints = [] if grid is None or self._ids is not None else list(grid)
        self._has_text_len = text_len is not None
        self._has_grid = grid is not None and self._ids is None
        ints = ([text_len] if self._has_text_len else []) + grid_ints
        # one empty tensor per int (no element, no memory; a single tensor of several such sizes overflows the
        # storage size torch computes)
        self._sizes = tuple(torch.empty(_SIZE_OFFSET + int(i), 0) for i in ints)

    @property
    def text_len(self) -> Optional[int]:
        return self._sizes[0].shape[0] - _SIZE_OFFSET if self._has_text_len else None

    @property
    def grid(self) -> Union[None, Tuple[int, ...], torch.Tensor]:
        if self._ids is not None:
            return self._ids
        if not self._has_grid:
            return None
        return tuple(t.shape[0] - _SIZE_OFFSET for t in self._sizes[int(self._has_text_len):])


def eager_when_called_by_torch(function: Callable) -> None:
    """Run ``function`` (a forward hook) eagerly when torch calls it outside any compiled frame, as
    ``torch.compile(transformer)`` does: the module's hooks are then frames of their own, and the one that makes the
    :class:`ForwardContext` would compile a graph of its own (its empty tensor) on every forward. Traced inline as
    before where a compiled frame calls it (``transformer.compile()``, a compiled function calling the
    transformer): its empty tensor is an op of that graph. A frame strategy of torch's dynamo (private: nothing
    changes where this torch has none)."""
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        set_code_exec_strategy(function.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    except (ImportError, AttributeError, TypeError):
        pass


# ---------------------------------------------------------------------------------------------- recording
# The maps reach the store through the custom op ``seg4diff_fast::record_maps``, registered as having a side
# effect: under torch.compile it stays in the graph, in order, and runs eagerly, so the graph never reads the
# store's dicts (dynamo would guard on them, and recompile once they fill after the first call) and the
# step count of ``steps="all"`` / a set of steps is a plain Python int outside the graph. The one thing a graph
# reads that changes with the steps is the site's bool "is the next step kept" (store._NextStep), which the op
# updates: two graphs for a set of steps, one for "mean" / "all".

_SITES: "weakref.WeakValueDictionary[int, CaptureSite]" = weakref.WeakValueDictionary()
_SITE_KEYS = itertools.count()


@torch.library.custom_op("seg4diff_fast::record_maps", mutates_args=())
def _record_maps(
    i2t: Optional[torch.Tensor], t2i: Optional[torch.Tensor], site: torch.Tensor, grid: Optional[Sequence[int]],
    ids: Optional[torch.Tensor], timestep: Optional[torch.Tensor], timestep_number: Optional[float],
    latents: Optional[torch.Tensor] = None, conditioning: Optional[torch.Tensor] = None,
) -> None:
    """Give one step of maps to the store of capture site ``site`` (its key, a 0-d tensor): ``i2t``
    ``[B', (H,) N_img, T]``, ``t2i`` ``[B', (H,) T, N_img]`` (rows already selected; None when not captured), the
    grid as ints (``(h, w)`` or ``(frames, h, w)``) or as position ``ids`` ``[(B,) N_img, C]`` (a grid callable
    cannot cross a custom op), the forward's timestep as a ``[B]`` / 0-d tensor or a number (or neither). Copies
    what it keeps: a compiled graph may reuse the memory of its intermediates."""
    capture_site = _SITES.get(int(site))
    if capture_site is None:  # the handle was removed and collected while a compiled graph still calls us
        return
    if latents is not None and _second_pass_at_run_time(capture_site, latents, conditioning):
        return  # not a step
    maps = {kind: m.clone() for kind, m in (("i2t", i2t), ("t2i", t2i)) if m is not None}
    grid = ids_grid(ids.clone()) if ids is not None else (None if grid is None else tuple(grid))
    timestep = timestep.clone() if timestep is not None else timestep_number
    capture_site.store._record(capture_site.name, maps, grid, timestep)


@_record_maps.register_fake
def _(i2t, t2i, site, grid, ids, timestep, timestep_number, latents=None, conditioning=None):
    return None


def _second_pass_at_run_time(site: "CaptureSite", latents: torch.Tensor, conditioning: torch.Tensor) -> bool:
    """Under torch.compile, ``CaptureHandle._second_pass`` cannot run (the pre-hook is traced; a tensor's identity
    is not a graph value), so ``record_maps`` decides at run time from the forward's latents and conditioning
    (``encoder_hidden_states``): the unconditional second pass evaluates the latents of the site's last step
    under other conditioning. "The same tensor" is read as: the step's tensor (held weakly) is still alive, at the
    same address, with the same shape and dtype (another live tensor there would be the same memory). If the
    graph hands the op fresh aliases, the weak references die and nothing is detected (the pass records as a
    step). Else it remembers this step's tensors."""
    def same(ref, t):
        held = None if ref is None else ref()
        return (held is not None and held.data_ptr() == t.data_ptr() and held.shape == t.shape
                and held.dtype == t.dtype)

    step = site._step_tensors or (None, None)
    if same(step[0], latents) and not same(step[1], conditioning):
        return True
    site._step_tensors = (weakref.ref(latents), weakref.ref(conditioning))
    return False


try:  # an effect keeps an op without outputs from being removed as dead code, and keeps it in order
    from torch._library.effects import EffectType

    _record_maps.register_effect(EffectType.ORDERED)
except (ImportError, AttributeError):  # torch < 2.8: eager and the graph-breaking paths still record
    pass


def _recomputing() -> bool:
    """Whether this call is gradient checkpointing's recomputation of a forward, run by autograd inside the
    backward (``torch.utils.checkpoint``, reentrant or not). Under torch.compile the backward graph recomputes
    without running Python again, so a compiled forward is never a recomputation."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _checkpointing(transformer) -> bool:
    """Whether this eager forward of ``transformer`` will be recomputed by gradient checkpointing in the backward
    (diffusers' ``enable_gradient_checkpointing()``, with gradients on). A compiled graph is never recomputed by
    Python (see :func:`_recomputing`)."""
    return (torch.is_grad_enabled() and bool(getattr(transformer, "gradient_checkpointing", False))
            and not torch.compiler.is_compiling())


@dataclass
class LayerSpec:
    """One capturable attention layer: its name (a module path, e.g. ``"transformer_blocks.9"``), its
    attention module, and its kind (``"joint"``: text comes as ``encoder_hidden_states``; ``"single"``: text
    already concatenated in front of the image tokens)."""

    name: str
    attn: torch.nn.Module
    kind: str


class CaptureSite:
    """The state of one captured layer, shared by its processor: store, layer name, and the handle that
    holds the current :class:`ForwardContext`. ``attention`` runs the fused kernel and records the maps."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name
        key = next(_SITE_KEYS)
        _SITES[key] = self
        # names this site to the record_maps op: a 0-d int64 tensor, data the compiled graph reads (an int would be
        # a constant dynamo guards on: blocks of one class would each compile a graph of their own)
        self.key = torch.tensor(key)
        self._step_tensors = None  # weak references to the last step's (latents, conditioning): _second_pass_at_run_time
        # whether the next step is kept (store._NextStep; None for sites without a store, e.g. guidance's)
        store = getattr(handle, "store", None)
        self._next_step = None if store is None else store._next_step(name)

    @property
    def store(self):
        return self.handle.store

    @property
    def context(self) -> ForwardContext:
        return self.handle.context

    def text_len(self) -> int:
        """Text length of the current forward, for single-stream layers (learnt by the pre-hook)."""
        text_len = self.context.text_len
        if text_len is None:
            raise RuntimeError(
                f"capture on {self.name!r}: the text length of this forward is unknown. A single-stream layer "
                "learns it from the transformer's forward (encoder_hidden_states.shape[1], read by a forward "
                "pre-hook); call the transformer, not the block on its own"
            )
        return text_len

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_slice: slice, scale: Optional[float] = None,
        original: Optional[Callable[..., torch.Tensor]] = None, key_mask: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``q, k, v``: ``[B, H, N, D]`` (views are fine); ``scale``: the softmax scale (``None``: ``D ** -0.5``).

        ``original``: the attention the layer's default processor runs (the dispatcher with the user's backend,
        or SDPA), called as ``original(q, k, v, rows)`` with ``q, k, v`` ``[B', H, N, D]`` of the batch ``rows``
        (``None``: all of them, else a list of indices, which the processor's per-row arguments such as a mask
        follow) and returning ``[B', H, N, D]``. It runs for what is not recorded (a forward that is not a step,
        a step outside the store's ``steps``, batch rows the store does not keep) instead of
        :func:`joint_attention`, and no map is computed there. ``None``: every row through :func:`joint_attention`.
        ``key_mask``: ``[B, N]`` bool, True = the key takes part (padded text); ``query_mask``: ``[B, N]`` bool or
        ``None``: queries with False have every key masked (an outer-product mask ``m_i & m_j``), so SDPA gives
        them a zero row: their ``out`` rows and their t2i rows are 0.
        Returns ``out`` ``[B, H, N, D]``, equal to SDPA's."""
        store = self.store
        if _recomputing():
            # Gradient checkpointing re-runs the block inside the backward: its forward recorded the maps
            # already, and the handle's context may belong to a later forward (another text length). Attention
            # only; the text block does not change ``out``, so any valid one will do (the masks do).
            masked = {} if key_mask is None else {"key_mask": key_mask}
            out = joint_attention(q, k, v, slice(0, 1), capture=None, scale=scale, backend=store.backend, **masked)[0]
            return out if query_mask is None else out * query_mask[:, None, :, None].to(out.dtype)
        if original is not None and _checkpointing(self.handle.transformer):
            # The recomputation above runs joint_attention for every row, since it cannot know what this forward
            # chose; the user's attention here would save other tensors and torch.utils.checkpoint would refuse
            # the backward. So every row goes through joint_attention; the maps of steps and rows not kept are
            # computed and dropped by the store (eager training with checkpointing only).
            original = None
        ctx = self.context
        rows = ctx.rows
        kept = None  # batch rows that go through joint_attention (sorted, unique); None: all of them
        if original is not None:
            if rows == SKIP:
                return original(q, k, v, None)
            if not self._step_kept():
                self._record({}, ctx)  # counts the step (steps is a set; this one is not in it)
                return original(q, k, v, None)
            kept = _kept_rows(rows, q.shape[0])
        capture = None if rows == SKIP else store.capture
        qkv = (q, k, v) if kept is None else tuple(_take(t, kept) for t in (q, k, v))
        if kept is not None:
            key_mask, query_mask = (None if m is None else _take(m, kept) for m in (key_mask, query_mask))
        masked = {} if key_mask is None else {"key_mask": key_mask}
        out, maps = joint_attention(
            *qkv, text_slice, capture=capture, heads=store.heads, text_index=store._text_index(q.device),
            map_dtype=store.map_dtype, scale=scale, backend=store.backend, normalize=store.normalize, **masked,
        )
        if query_mask is not None:
            out, maps = _zero_masked_queries(out, maps, query_mask, text_slice, store._text_index(q.device))
        if capture is not None:
            if kept is None:  # maps of every row: select the store's rows (in its order, repeats kept)
                index = None if rows is None else (rows if isinstance(rows, slice) else list(rows))
            else:  # maps of the kept rows only: the store's rows as positions among them
                index = [kept.index(r % q.shape[0]) for r in _row_list(rows, q.shape[0])]
                index = None if index == list(range(len(kept))) else index
            kept_maps = {}
            for kind, m in (("i2t", maps.i2t), ("t2i", maps.t2i)):
                if m is not None:
                    m = m.detach()  # first: an autograd index op would save tensors (checkpointing counts them)
                    kept_maps[kind] = m if index is None else m[index]
            self._record(kept_maps, ctx)
        if kept is not None:
            # the other rows: the user's attention; out back in batch order [B, H, N, D]
            rest = [r for r in range(q.shape[0]) if r not in kept]
            out_rest = original(*(_take(t, rest) for t in (q, k, v)), rest)
            order = kept + rest
            out = torch.cat([out, out_rest])
            if order != sorted(order):
                out = out[[order.index(r) for r in range(len(order))]]
        return out

    def _step_kept(self) -> bool:
        """Whether this forward's step of the layer will be kept by the store: the layer's flag, which the
        ``record_maps`` op updates after each step. A compiled graph reads it at trace time and dynamo guards on
        it, so a set of ``steps`` gives two graphs (kept / not kept), never one per step (see store._NextStep)."""
        return self._next_step.kept

    def _record(self, maps: Dict[str, torch.Tensor], ctx: ForwardContext) -> None:
        """Give one step (``maps``: ``{"i2t": [B', (H,) N_img, T], "t2i": ...}``, possibly empty: a step not kept)
        to the store through the ``record_maps`` op."""
        ids = ctx.grid if isinstance(ctx.grid, torch.Tensor) else None
        grid = None if ids is not None or ctx.grid is None else list(ctx.grid)
        ts = ctx.timestep
        ts_tensor = ts if isinstance(ts, torch.Tensor) else None
        ts_number = None if ts is None or ts_tensor is not None else float(ts)
        torch.ops.seg4diff_fast.record_maps(maps.get("i2t"), maps.get("t2i"), self.key, grid, ids, ts_tensor, ts_number,
                                            *(ctx.pass_tensors or (None, None)))


def _zero_masked_queries(out: torch.Tensor, maps, query_mask: torch.Tensor, text_slice: slice,
                         text_index: Optional[torch.Tensor]):
    """What SDPA gives queries whose keys are all masked: zero ``out`` rows (``[B, H, N, D]``) and zero t2i rows
    (``[B, (H,) T', N_img]``, text positions ``text_slice`` then ``text_index``); ``query_mask`` ``[B, N]`` bool."""
    out = out * query_mask[:, None, :, None].to(out.dtype)
    if maps.t2i is not None:
        text_rows = query_mask[:, text_slice]  # [B, T]
        if text_index is not None:
            text_rows = text_rows[:, text_index]
        text_rows = text_rows[:, None, :, None] if maps.t2i.ndim == 4 else text_rows[:, :, None]
        maps = dataclasses.replace(maps, t2i=maps.t2i * text_rows.to(maps.t2i.dtype))
    return out, maps


def _row_list(rows: Union[None, slice, Tuple[int, ...]], batch_size: int) -> List[int]:
    """The store's batch rows as a list of indices (negative ones as given)."""
    if rows is None:
        return list(range(batch_size))
    if isinstance(rows, slice):
        return list(range(batch_size))[rows]
    return list(rows)


def _kept_rows(rows, batch_size: int) -> Optional[List[int]]:
    """Sorted unique batch rows the store keeps, or ``None`` when it keeps every row."""
    kept = sorted({r % batch_size for r in _row_list(rows, batch_size)})
    return None if len(kept) == batch_size else kept


def _take(t: torch.Tensor, rows: List[int]) -> torch.Tensor:
    """``t[rows]`` on the batch axis: a view when the rows are consecutive (the conditional half), a copy
    otherwise."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]: rows[0] + len(rows)]
    return t[rows]


def check_old_processor(spec: LayerSpec, old, allowed: Tuple[type, ...]) -> None:
    if type(old) not in allowed:
        raise ValueError(
            f"layer {spec.name!r} runs {type(old).__name__}; capture replicates only "
            f"{', '.join(c.__name__ for c in allowed)} (IP-adapter, KV-cache and other custom processors change "
            "the attention, so capture cannot stand in for them)"
        )


def no_direct_construction(processor) -> None:
    """The capture processors are made by :func:`~seg4diff_fast.capture.register`, with their capture site.
    diffusers' IP-adapter loader rebuilds every processor it does not replace with ``type(processor)()``:
    say what happened instead of an opaque TypeError deep inside diffusers."""
    raise TypeError(
        f"{type(processor).__name__} is a seg4diff_fast capture processor: register() creates it, bound to its "
        "layer and store, and it cannot be built without them (diffusers' IP-adapter loader rebuilds processors "
        "with type(processor)()). Capture refuses IP-adapter processors by design: call handle.remove() before "
        "load_ip_adapter(), and capture layers that keep their default processor"
    )


def ids_grid(ids: torch.Tensor) -> Callable[[], Tuple[int, int]]:
    """Grid of Flux-style position ids ``[N_img, C]`` (column 1 = row, column 2 = column of the patch), computed
    when read. Tokens sharing the first token's column 0 (the generated image; Kontext / reference images
    have another index there) make the grid."""

    def grid() -> Tuple[int, int]:
        i = ids[0] if ids.ndim == 3 else ids
        i = i[i[:, 0] == i[0, 0]]
        h = int(i[:, 1].max() - i[:, 1].min()) + 1
        w = int(i[:, 2].max() - i[:, 2].min()) + 1
        return h, w

    grid.ids = ids  # the store compares the ids of successive steps on the device (AttentionStore._check_size)
    return grid
