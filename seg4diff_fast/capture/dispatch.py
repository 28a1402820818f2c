"""Capture by intercepting the attention call of one layer's own diffusers processor.

Most diffusers processors end in one attention call: ``dispatch_attention_fn(q, k, v, ...)`` (q, k, v
``[B, N, H, D]``; 48 transformer modules of diffusers 0.42 call it, see ``tools/survey_transformers.py``) or ``F.scaled_dot_product_attention(q, k, v, ...)``
(``[B, H, N, D]``; CogView4, CogVideoX, HiDream ...). At that call q, k, v have been through every
projection, norm and rotary embedding of the model, so capture needs no copy of the processor: only where the
text sits in the joint sequence, its length and the image grid (the family adapter's knowledge).

How the call of the registered layer (and of no other) is intercepted: the capture processor is a shallow copy
of the layer's processor (``site``: its layer) of a capture class shared by every layer running that processor
class, whose ``__call__`` is the original's source recompiled with its attention call, ``dispatch_attention_fn(q, k,
v, ...)`` or ``F.scaled_dot_product_attention(q, k, v, ...)``, made a call of the class's capture function with the
processor first (:func:`_capture_class`). The function is bound to a COPY of the module's globals that holds the
capture function. Nothing global is patched: other layers, other models and other threads keep calling
diffusers' function, ``remove()`` only puts the original processor object back, and ``torch.compile`` traces a
plain function that reads its layer as data (no thread-local or global state, no code per layer: compiled blocks
of one class share one graph).

Limits. Checked at ``register`` (refused with the reason): the layer runs one of the processor classes its
adapter lists (each makes exactly one attention call per layer call, read from its source), and that
class's ``__call__`` calls the attention itself (a helper function that calls it would see the real one).
At the call (refused there, before any compute; under torch.compile the values of a ``[B, 1, N, N]`` mask are checked
by an op inside the graph, :func:`_check_outer_mask`): an attention mask that is not a key mask, a key bias or one of
the outer products of a token mask that :func:`_key_mask` reproduces,
dropout, causal attention, grouped-query attention, a context-parallel config, self-attention of another
length than the joint sequence (cross-attention).

What the store does not record (a forward that is not a step, a step outside its ``steps``, batch rows outside
its ``batch``) goes to the processor's own call, with its arguments as given (the user's backend included), see
:meth:`~seg4diff_fast.capture.base.CaptureSite.attention`.
"""
from __future__ import annotations

import __future__
import ast
import inspect
import itertools
import sys
import textwrap
import types
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import _SITES, SKIP, CaptureSite, no_direct_construction

__all__ = ["InterceptingProcessor", "intercepting_processor", "attention_call_name"]

_DISPATCH = "dispatch_attention_fn"  # called with [B, N, H, D]
_SDPA_MODULE = "F"  # torch.nn.functional, whose scaled_dot_product_attention is called with [B, H, N, D]
_names = itertools.count(1)  # numbers the modules holding the capture processors' globals (atomic in CPython)


class InterceptingProcessor:
    """Marker base of every capture processor made by :func:`intercepting_processor`. ``site``: the capture site
    of its layer, which its attention calls go to (plain data: a copy with another ``site`` captures there, as
    :class:`~.families.sd3.SD3CaptureProcessor` does); ``_capture_original``: the processor it was made
    from."""

    site: CaptureSite
    _capture_original: object


def _refuse_init(self, *args, **kwargs):
    no_direct_construction(self)


def attention_call_name(processor_class: type) -> Optional[str]:
    """The global name through which ``processor_class.__call__`` reaches attention: ``"dispatch_attention_fn"``,
    ``"F"`` (``F.scaled_dot_product_attention``) or ``None`` (neither: not interceptable here)."""
    call = getattr(processor_class, "__call__", None)
    code = getattr(call, "__code__", None)
    if code is None:
        return None
    names, glb = code.co_names, call.__globals__
    if _DISPATCH in names and _DISPATCH in glb:
        return _DISPATCH
    if _SDPA_MODULE in names and "scaled_dot_product_attention" in names and glb.get(_SDPA_MODULE) is F:
        return _SDPA_MODULE
    return None


def _text_slice(site: CaptureSite, text_at: str, n: int) -> Tuple[int, int]:
    """``(start, stop)`` of the text block in a joint sequence of ``n`` tokens ("start": ``[text, image]``,
    "end": ``[image, text]``), with the text length the transformer's forward pre-hook read."""
    text_len = site.text_len()
    if not 0 < text_len < n:
        raise ValueError(
            f"capture on {site.name!r}: the attention sees {n} tokens, but this forward's text has {text_len}; "
            "a joint sequence holds the text and at least one image token"
        )
    return (0, text_len) if text_at == "start" else (n - text_len, n)


def _key_mask(site: CaptureSite, attn_mask: torch.Tensor, batch: int, n: int, heads: int
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The key mask an attention mask stands for: ``(key_mask [B, N], query_mask [B, N] bool or None,
    unbiased_queries [B, N] bool or None)``. ``key_mask`` is what :func:`joint_attention` takes: bool (True = the
    key takes part) or float (an additive key bias, SDPA's convention, ``-inf`` = masked).

    Accepted (what the processors of diffusers pass), as SDPA reads them:

    - a mask that broadcasts over the queries and heads, ``[B, 1, 1, N]`` (batch 1 broadcasting; ``[B, N]`` and
      ``[B, 1, N]`` are refused: SDPA reads them as ``[queries, keys]`` and ``[heads, queries, keys]``, and only
      some dispatcher backends reshape a ``[B, N]`` mask), boolean or additive float with any values (0 / -inf,
      ``torch.finfo(dtype).min``, a real bias): the key mask itself;
    - the boolean outer product ``m_i & m_j`` ``[B, 1, N, N]`` that HunyuanVideo 1.5 builds from a per-token
      mask ``m`` (Chroma's transformer too when given a bool mask): its keys are ``m``, and a query with ``m_i``
      false has every key masked, which SDPA answers with a zero row (``query_mask``);
    - the float outer product ``m_i * m_j`` ``[B, 1, N, N]`` of a 0 / 1 token mask ``m``, what ChromaPipeline's
      transformer builds and SDPA ADDS to the scores: a query with ``m_i = 1`` sees the key bias ``m`` (+1 on
      valid keys, +0 on padding), a query with ``m_i = 0`` sees bias 0 on every key, plain attention
      (``unbiased_queries``; they must be text queries: the caller recomputes those rows).

    Anything else (a mask that differs per query in another way, per head, an integer mask) is refused. The
    shapes are checked here; the values of a ``[B, 1, N, N]`` mask by :func:`_check_outer_mask`, which the caller
    runs once it knows the text block."""
    def where() -> str:  # built when raising only: under torch.compile, reading the layer's name guards on it
        return (f"capture on {site.name!r}: its processor passes an attention mask of shape "
                f"{tuple(attn_mask.shape)} and dtype {attn_mask.dtype}")

    shape = tuple(attn_mask.shape)
    if attn_mask.ndim != 4 or shape[0] not in (1, batch) or shape[-1] != n:
        raise ValueError(f"{where()}; expected a key mask [B, 1, 1, N] (or [B, 1, N, N]) with B = {batch}, N = {n}")
    if shape[1] != 1:
        raise ValueError(f"{where()}, which differs between heads ({heads}): capture supports key masks only")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(f"{where()}; expected a boolean or an additive float mask")
    query_mask = unbiased = None
    if shape[-2] != 1:
        if shape[-2] != n:
            raise ValueError(f"{where()}; expected [B, 1, 1, N] or [B, 1, N, N] with N = {n}")
        diagonal = attn_mask.reshape(shape[0], n, n).diagonal(dim1=-2, dim2=-1)  # [B, N]: m_i & m_i = m_i * m_i = m_i
        if attn_mask.dtype == torch.bool:
            query_mask = diagonal.expand(batch, n)
        else:
            unbiased = (diagonal == 0).expand(batch, n)
        attn_mask = diagonal
    key_mask = attn_mask.reshape(shape[0], n).expand(batch, n)  # [B, N]
    return key_mask, query_mask, unbiased


@torch.library.custom_op("seg4diff_fast::check_outer_mask", mutates_args=())
def _check_outer_mask(site: torch.Tensor, attn_mask: torch.Tensor, start: int, stop: int) -> None:
    """Refuse, with a ``ValueError`` naming the layer, a ``[B, 1, N, N]`` attention mask that capture does not
    reproduce (see :func:`_key_mask`): not the outer product ``m_i & m_j`` (bool) or ``m_i * m_j`` of a 0 / 1 token
    mask ``m`` (float; its diagonal is ``m``); for the float product, a query with ``m_i = 0`` (it sees no bias in
    SDPA) outside the text block ``[start, stop)`` (its i2t row would need a second softmax), or in the text block
    when the store records t2i (recorded with the bias the other rows see). ``site``: the capture site's key.

    It reads the mask's values (a device sync), so it is a custom op with an effect: under torch.compile it runs
    eagerly inside the graph, in order before the layer's ``record_maps`` (no graph break: ``fullgraph=True`` and
    regional compilation work with a Chroma or HunyuanVideo 1.5 mask), and eager capture calls the same op before
    its attention. Under torch.compile the graph may compute the layer's attention before the op raises; nothing is
    recorded and the forward fails."""
    capture_site = _SITES.get(int(site))
    name = "?" if capture_site is None else capture_site.name
    b, n = attn_mask.shape[0], attn_mask.shape[-1]
    where = f"capture on {name!r}: its processor passes an attention mask of shape {tuple(attn_mask.shape)} and " \
            f"dtype {attn_mask.dtype}"
    square = attn_mask.reshape(b, n, n)  # [B, N queries, N keys]
    diagonal = square.diagonal(dim1=-2, dim2=-1)  # [B, N]
    if attn_mask.dtype == torch.bool:
        outer, what = diagonal[:, :, None] & diagonal[:, None, :], "the outer product m_i & m_j of one token mask"
    else:
        outer, what = diagonal[:, :, None] * diagonal[:, None, :], "the outer product m_i * m_j of one 0 / 1 mask"
        if not bool(((diagonal == 0) | (diagonal == 1)).all()):
            raise ValueError(f"{where}, whose diagonal is not a 0 / 1 token mask: {what} is expected "
                             "(a per-query bias cannot be reproduced)")
    if not torch.equal(square, outer):
        raise ValueError(f"{where}, which differs between queries (not {what}): capture supports key masks only")
    if attn_mask.dtype == torch.bool:
        return
    unbiased = diagonal == 0  # [B, N]
    if bool(unbiased[:, :start].any()) or bool(unbiased[:, stop:].any()):
        raise ValueError(
            f"capture on {name!r}: its float outer-product mask m_i * m_j has m_i = 0 on image queries, which "
            "see no bias in SDPA: capture reproduces such queries in the text block only"
        )
    store = None if capture_site is None else getattr(capture_site.handle, "store", None)
    if store is not None and store.capture in ("t2i", "both"):
        text_rows = unbiased[:, start:stop]  # [B, T_full]
        index = store._text_index(unbiased.device)
        if index is not None:
            text_rows = text_rows[:, index]
        if bool(text_rows.any()):
            raise ValueError(
                f"capture on {name!r}: its mask m_i * m_j (ChromaPipeline's) gives the padding text queries "
                "(m_i = 0) no bias at all, unlike the other rows: their t2i rows are not captured. Capture 'i2t', "
                "or keep only unpadded text tokens (text_index / token selection)"
            )


@_check_outer_mask.register_fake
def _(site, attn_mask, start, stop):
    return None


try:  # an effect keeps an op without outputs from being removed as dead code, and keeps it in order
    from torch._library.effects import EffectType

    _check_outer_mask.register_effect(EffectType.ORDERED)
except (ImportError, AttributeError):  # torch < 2.8: the op is a graph break there, as the check was before
    pass


def _unbiased_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unbiased: torch.Tensor,
                   start: int, stop: int, scale: Optional[float], rows) -> torch.Tensor:
    """``out`` ``[B, H, N, D]`` (every query with the key bias) with the text query rows that see no bias
    (``unbiased`` ``[B, N]`` bool, inside ``[start, stop)``) replaced by plain attention over all keys, recomputed
    for the text block only (``[B', H, T, D]`` through SDPA, what diffusers' native backend runs), for the batch
    ``rows`` (a list; the others came from the user's own attention call and are exact already)."""
    if not rows:
        return out
    index = torch.tensor(rows, device=out.device)
    plain = F.scaled_dot_product_attention(q[index, :, start:stop], k[index], v[index], scale=scale)  # [B', H, T, D]
    text = out[index, :, start:stop]
    fixed = torch.where(unbiased[index, None, start:stop, None], plain.to(out.dtype), text)
    out = out.clone()
    out[index, :, start:stop] = fixed
    return out


def _sdpa_now(*args, **kwargs):
    """``F.scaled_dot_product_attention`` as it is at the call (what the default processor would run then)."""
    return F.scaled_dot_product_attention(*args, **kwargs)


def _capture_call(text_at: str, layout: str, original: Callable) -> Callable:
    """The function that stands in for the attention call of one capture class, called with the processor first
    (its layer is ``processor.site``), then the attention call's own arguments. ``layout``: ``"bnhd"``
    (dispatcher) or ``"bhnd"`` (SDPA). Returns what the original returns: ``[B, N, H, D]`` resp. ``[B, H, N, D]``."""

    def attention(processor, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        site = processor.site
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:
            kwargs["enable_gqa"] = enable_gqa
        if layout == "bnhd":
            kwargs.update(attention_kwargs=attention_kwargs, backend=backend, parallel_config=parallel_config)
        if site.context.rows == SKIP:  # not a step (e.g. Flux's true-CFG unconditional pass): the user's attention
            return original(query, key, value, **kwargs)

        to_user = []  # the batch rows given to users_attention (None: all of them), for the unbiased queries

        def users_attention(q, k, v, rows):
            """The processor's own attention call on ``[B', H, N, D]``: the batch ``rows`` (None: all; the mask's
            rows follow them)."""
            to_user.append(rows)
            own = kwargs
            if rows is not None and attn_mask is not None and attn_mask.shape[0] != 1:
                own = dict(kwargs, attn_mask=attn_mask[rows])
            if layout == "bhnd":
                return original(q, k, v, **own)
            return original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **own).transpose(1, 2)

        why = None
        if dropout_p:
            why = f"its processor asks for attention dropout (dropout_p={dropout_p})"
        elif is_causal:
            why = "its processor asks for causal attention"
        elif parallel_config is not None:
            why = "its processor runs context parallelism (enable_parallelism)"
        elif attention_kwargs:
            why = f"its processor passes backend options {sorted(attention_kwargs)}"
        elif query.ndim != 4 or key.shape != query.shape or value.shape[:-1] != query.shape[:-1]:
            why = (f"q, k, v of shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} are not "
                   "self-attention over one joint sequence with as many key heads as query heads")
        if why is not None:
            raise ValueError(f"capture on {site.name!r}: {why}")
        if layout == "bnhd":  # [B, N, H, D] -> [B, H, N, D] views
            query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        start, stop = _text_slice(site, text_at, query.shape[2])
        # scale and masks only when the processor sets them: sites that stand in for CaptureSite.attention
        # (guidance's perturbing site) take (q, k, v, text_slice, original=...)
        extra = {} if scale is None else {"scale": scale}
        unbiased = None
        if attn_mask is not None:
            extra["key_mask"], query_mask, unbiased = _key_mask(site, attn_mask, query.shape[0], query.shape[2],
                                                                query.shape[1])
            if attn_mask.shape[-2] != 1:  # [B, 1, N, N]: its values are checked (an op: no graph break)
                torch.ops.seg4diff_fast.check_outer_mask(site.key, attn_mask, start, stop)
            if query_mask is not None:
                extra["query_mask"] = query_mask
        out = site.attention(query, key, value, slice(start, stop), original=users_attention, **extra)  # [B, H, N, D]
        if unbiased is not None and None not in to_user:
            # rows through joint_attention saw the key bias on every query: the unbiased text queries' rows again
            user_rows = {r for rows in to_user for r in rows}
            rows = [r for r in range(query.shape[0]) if r not in user_rows]
            out = _unbiased_rows(out, query, key, value, unbiased, start, stop, scale, rows)
        return out.transpose(1, 2) if layout == "bnhd" else out

    return attention


_CAPTURE = "_seg4diff_capture_attention"  # the capture function's name in a capture class's globals

# (processor class, text_at, wrapper) -> the capture class standing in for it (weak: it lives while a processor does)
_CLASSES: "weakref.WeakValueDictionary[tuple, type]" = weakref.WeakValueDictionary()


class _RouteAttention(ast.NodeTransformer):
    """Rewrites the attention calls of a ``__call__``'s syntax tree, ``dispatch_attention_fn(q, k, v, ...)`` or
    ``F.scaled_dot_product_attention(q, k, v, ...)``, into ``_seg4diff_capture_attention(self, q, k, v, ...)``."""

    def __init__(self, name: str, processor: str):
        self.name, self.processor, self.calls = name, processor, 0

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        f = node.func
        if (isinstance(f, ast.Name) and f.id == self.name == _DISPATCH) or (
                self.name == _SDPA_MODULE and isinstance(f, ast.Attribute) and f.attr == "scaled_dot_product_attention"
                and isinstance(f.value, ast.Name) and f.value.id == _SDPA_MODULE):
            node.func = ast.copy_location(ast.Name(_CAPTURE, ast.Load()), f)
            node.args.insert(0, ast.copy_location(ast.Name(self.processor, ast.Load()), f))
            self.calls += 1
        return node


def _capture_class(cls: type, name: str, text_at: str, wrap: Optional[Callable]) -> type:
    """The capture processor class standing in for ``cls``, whose ``__call__`` reaches attention through the global
    ``name``: a subclass whose ``__call__`` is ``cls.__call__`` recompiled from its source (same signature,
    defaults, file and line numbers) with its attention call handing the processor itself, then the call's own
    arguments, to the class's capture function (:func:`_capture_call`; ``wrap(capture_function, text_at)``, if
    given, adapts it to another attention call). Every layer of the class runs this one function and finds its
    layer as data, ``processor.site``: no state set around the call (a traced side effect, which activation
    checkpointing refuses under torch.compile), no per-layer function (compiled blocks of one class share one
    graph). Raises if the source does not call attention itself."""
    call = cls.__call__
    code = call.__code__
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(call)))
    except (OSError, TypeError) as e:  # no source file (a bytecode-only install, a class made at run time)
        raise ValueError(f"capture reads {cls.__name__}.__call__'s source to intercept its attention: {e}") from None
    fn = tree.body[0]
    plain = isinstance(fn, ast.FunctionDef) and fn.args.args and not fn.decorator_list and not code.co_freevars
    route = _RouteAttention(name, fn.args.args[0].arg if plain else "")
    if plain:
        route.visit(fn)
    if route.calls == 0:
        raise ValueError(
            f"{cls.__name__}.__call__ does not call {name if name == _DISPATCH else 'F.scaled_dot_product_attention'} "
            "by name in a plain method (no decorator, no closure); capture cannot intercept its attention"
        )
    ast.increment_lineno(tree, code.co_firstlineno - 1)
    # The function's globals are a copy of its module's plus the capture function, the namespace of a module of its
    # own, in sys.modules while the capture class lives: torch.compile finds an inlined function's globals by
    # importing its __name__. Annotations stay unevaluated strings, as under `from __future__ import annotations`.
    module_name = f"{__name__}._capture{next(_names)}"
    module = types.ModuleType(module_name)
    glb = module.__dict__
    glb.update(call.__globals__)
    glb.update(__name__=module_name, __spec__=None, __loader__=None)  # not an importable copy of the original
    layout, original = ("bnhd", glb[name]) if name == _DISPATCH else ("bhnd", _sdpa_now)
    capture = _capture_call(text_at, layout, original)
    glb[_CAPTURE] = capture if wrap is None else wrap(capture, text_at)
    exec(compile(tree, code.co_filename, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True), glb)
    own_call = glb.pop(fn.name)
    own_call.__defaults__, own_call.__kwdefaults__ = call.__defaults__, call.__kwdefaults__
    own_call.__qualname__ = call.__qualname__
    own_call.__annotations__ = dict(getattr(call, "__annotations__", {}))
    # __init__ refuses: diffusers' IP-adapter loader rebuilds processors with type(processor)(), which would
    # otherwise build the original class's processor with no capture site behind it
    capture_cls = type(
        f"Capture{cls.__name__}", (cls, InterceptingProcessor), {"__call__": own_call, "__init__": _refuse_init}
    )
    sys.modules[module_name] = module
    weakref.finalize(capture_cls, sys.modules.pop, module_name, None)
    return capture_cls


def intercepting_processor(old, site: CaptureSite, text_at: str, wrap: Optional[Callable] = None):
    """A capture processor for one layer: a shallow copy of ``old`` of the capture class standing in for
    ``type(old)`` (one class per processor class, shared by every layer and model that runs it; the layer is the
    processor's ``site``, an attribute). ``text_at``: ``"start"`` (``[text, image]``) or ``"end"`` (``[image,
    text]``); ``wrap``: see :func:`_capture_class`."""
    cls = type(old)
    name = attention_call_name(cls)
    if name is None:
        raise ValueError(
            f"layer {site.name!r} runs {cls.__name__}, whose __call__ calls neither dispatch_attention_fn nor "
            "F.scaled_dot_product_attention itself; capture cannot intercept its attention"
        )
    key = (cls, text_at, wrap)
    capture_cls = _CLASSES.get(key)
    if capture_cls is None:
        try:
            capture_cls = _CLASSES[key] = _capture_class(cls, name, text_at, wrap)
        except ValueError as e:
            raise ValueError(f"layer {site.name!r}: {e}") from None
    new = object.__new__(capture_cls)  # no __init__: a copy of old's state (backend, parallel config ...)
    new.__dict__.update(vars(old))
    new.site = site
    new._capture_original = old
    return new
