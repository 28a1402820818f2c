"""Property-based fuzzing of ``joint_attention``'s arguments (hypothesis).

- Valid random combinations (shapes, token order, capture, heads, text_index with repeats, map dtype, input dtype,
  strides, scale, normalize) agree with the float64 oracle on the torch and reference backends.
- Invalid ones (one argument broken at a time, in a random way) raise ValueError or TypeError whose message names
  that argument, before any backend runs (the backends are replaced by tripwires).

Examples are derandomized (the same inputs every run, no example database), small shapes, about 40 s on 2 cores.
"""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import seg4diff_fast.attention as attention
from conftest import MAP_TOL, OUT_TOL
from seg4diff_fast import joint_attention
from seg4diff_fast.reference import reference_joint_attention


def fuzz(max_examples):
    return settings(deadline=None, derandomize=True, database=None, max_examples=max_examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

N_VALID = 60
N_INVALID_EACH = 20  # x 13 kinds of bad input = 260 bad calls
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    """A valid call: ``(q, k, v, text_slice, kwargs)`` with fresh random inputs."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_text, n_img, d = draw(st.integers(1, 19)), draw(st.integers(1, 41)), draw(st.integers(1, 40))
    n = n_text + n_img
    backend = draw(st.sampled_from(["torch", "reference"]))
    # the reference backend computes in the input dtype (Seg4Diff's own path): compared in float32 only
    dtype = torch.float32 if backend == "reference" else draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["bhnd", "bnhd", "fused"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "bhnd":
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    elif layout == "bnhd":
        q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3))
    else:  # sliced out of a fused [B, N, 3, H, D] projection: not dense
        qkv = torch.randn(b, n, 3, h, d, generator=g)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q = q * draw(st.sampled_from([0.5, 1.0, 2.0]))  # from near-uniform to peaked softmax
    q, k, v = (t.to(dtype) for t in (q, k, v))
    text_first = draw(st.booleans())
    start, stop = (0, n_text) if text_first else (n_img, n)
    text_slice = draw(st.sampled_from([slice(start, stop), (start, stop)]))
    text_index = None
    if draw(st.booleans()):
        cols = draw(st.lists(st.integers(0, n_text - 1), min_size=1, max_size=8))
        text_index = torch.tensor(cols, dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.int16])))
    kwargs = dict(
        capture=draw(st.sampled_from(["i2t", "t2i", "both", None])),
        heads=draw(st.sampled_from(["mean", "all"])),
        text_index=text_index,
        map_dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.integers(1, 2))),
        backend=backend,
        normalize=draw(st.sampled_from(["joint", "text", "logits"])),
    )
    return q, k, v, text_slice, kwargs


@fuzz(N_VALID)
@given(problems())
def test_valid_arguments_agree_with_the_float64_oracle(problem):
    q, k, v, text_slice, kw = problem
    start, stop = (text_slice.start, text_slice.stop) if isinstance(text_slice, slice) else text_slice
    out, maps = joint_attention(q, k, v, text_slice, **kw)
    ref_out, ref_i2t, ref_t2i = reference_joint_attention(
        q, k, v, start, stop, capture=kw["capture"], heads=kw["heads"], text_index=kw["text_index"], scale=kw["scale"],
        normalize=kw["normalize"])
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == torch.empty_like(q).stride()
    torch.testing.assert_close(out.double(), ref_out, atol=OUT_TOL[q.dtype][0], rtol=OUT_TOL[q.dtype][1])
    for got, ref in ((maps.i2t, ref_i2t), (maps.t2i, ref_t2i)):
        assert (got is None) == (ref is None)
        if ref is not None:
            atol, rtol = MAP_TOL[kw["map_dtype"]]
            assert got.dtype == kw["map_dtype"] and got.shape == ref.shape
            torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- invalid
# Each breaker takes (draw, q, k, v, text_slice, kwargs) of a valid call and breaks ONE argument at random.
# It returns the name that the error message must contain.


def _shape_of(q):
    return tuple(q.shape)


def _break_tensor_type(draw, args):
    name = draw(st.sampled_from(["q", "k", "v"]))
    args[name] = draw(st.sampled_from([
        args[name].tolist(), args[name].float().numpy(), 1.0, None, "q", (args[name],),
    ]))
    return name, TypeError


def _break_rank(draw, args):
    name = draw(st.sampled_from(["q", "k", "v"]))
    t = args[name]
    args[name] = draw(st.sampled_from([t[0], t[None], t.flatten(), t.reshape(-1)[:1]]))
    return name, ValueError


def _break_shape(draw, args):
    name = draw(st.sampled_from(["k", "v", "q"]))
    b, h, n, d = args[name].shape
    axis = draw(st.integers(0, 3))
    new = [b, h, n, d]
    new[axis] += draw(st.integers(1, 3))
    args[name] = torch.randn(*new)
    return name, ValueError


def _break_dtype(draw, args):
    name = draw(st.sampled_from(["q", "k", "v"]))
    dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]))
    args[name] = args[name].to(dtype)
    return name, TypeError


def _break_dtype_mix(draw, args):
    name = draw(st.sampled_from(["k", "v"]))
    other = [d for d in DTYPES if d != args["q"].dtype]
    args[name] = args[name].to(draw(st.sampled_from(other)))
    return "same dtype", TypeError


def _break_last_stride(draw, args):
    name = draw(st.sampled_from(["q", "k", "v"]))
    t = args[name]
    if t.shape[-1] == 1:  # a one-wide head dim has no stride to break: widen all three
        for key in ("q", "k", "v"):
            args[key] = torch.randn(*t.shape[:-1], 3)
        t = args[name]
    args[name] = torch.randn(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    return name, ValueError


def _break_head_dim(draw, args):
    b, h, n, _ = args["q"].shape
    d = draw(st.sampled_from([257, 300, 512]))
    for key in ("q", "k", "v"):
        args[key] = torch.randn(b, h, n, d)
    return "head dim", ValueError


def _break_empty(draw, args):
    b, h, n, d = args["q"].shape
    shape = [b, h, n, d]
    shape[draw(st.sampled_from([0, 1, 3]))] = 0
    for key in ("q", "k", "v"):
        args[key] = torch.randn(*shape)
    return "must not be empty", ValueError


def _break_text_slice(draw, args):
    n = args["q"].shape[2]
    start = draw(st.integers(-3, n + 3))
    stop = draw(st.integers(-3, n + 3))
    valid = 0 <= start < stop <= n and (start == 0 or stop == n) and stop - start < n
    if valid:  # make it invalid in one of the ways a caller gets it wrong
        start, stop = draw(st.sampled_from([(stop, start), (start, n + 1), (-1, stop), (0, n), (start, start)]))
    form = draw(st.sampled_from(["slice", "tuple", "list"]))
    args["text_slice"] = slice(start, stop) if form == "slice" else (start, stop) if form == "tuple" else [start, stop]
    return "text_slice", ValueError


def _break_text_slice_type(draw, args):
    n = args["q"].shape[2]
    args["text_slice"] = draw(st.sampled_from([
        slice(0, 1, 2), (0.0, 1), (0, float(n)), (True, n), "0:1", None, 3, (0, 1, 2), slice(None, None),
        (torch.tensor(0), 1), {"start": 0},
    ]))
    return "text_slice", (TypeError, ValueError)


def _break_text_index(draw, args):
    start, stop = _bounds(args)
    n_text = stop - start
    bad = draw(st.sampled_from(["high", "negative", "float", "bool", "2d", "empty", "list", "meta", "complex"]))
    args["kwargs"]["text_index"] = {
        "high": lambda: torch.tensor([0, n_text + draw(st.integers(0, 5))]),
        "negative": lambda: torch.tensor([draw(st.integers(-5, -1))]),
        "float": lambda: torch.tensor([0.0, 1.0]),
        "bool": lambda: torch.tensor([True]),
        "2d": lambda: torch.zeros(1, 1, dtype=torch.long),
        "empty": lambda: torch.zeros(0, dtype=torch.long),
        "list": lambda: [0],
        "meta": lambda: torch.zeros(1, dtype=torch.long, device="meta"),
        "complex": lambda: torch.zeros(1, dtype=torch.complex64),
    }[bad]()
    return "text_index", (TypeError, ValueError)


def _bounds(args):
    ts = args["text_slice"]
    return (ts.start, ts.stop) if isinstance(ts, slice) else ts


def _break_option(draw, args):
    name = draw(st.sampled_from(["capture", "heads", "backend", "map_dtype", "normalize"]))
    args["kwargs"][name] = draw(st.sampled_from([
        "I2T", "mean ", "all_heads", "", 0, 1.5, ["i2t"], ("mean",), torch.float64, torch.int8, "float16", "cuda",
    ]))
    return name, (ValueError, TypeError)


def _break_scale(draw, args):
    args["kwargs"]["scale"] = draw(st.sampled_from([
        0, 0.0, -1.0, -1e-9, float("inf"), float("-inf"), float("nan"), True, "0.1", torch.tensor(0.1), 1j, [0.1],
    ]))
    return "scale", ValueError


BREAKERS = [_break_tensor_type, _break_rank, _break_shape, _break_dtype, _break_dtype_mix, _break_last_stride,
            _break_head_dim, _break_empty, _break_text_slice, _break_text_slice_type, _break_text_index, _break_option,
            _break_scale]


@pytest.fixture
def tripwires(monkeypatch):
    """Any backend that runs fails the test with an AssertionError (not the ValueError/TypeError expected)."""
    def ran(*args, **kwargs):
        raise AssertionError("a backend ran on invalid arguments")

    for name in ("_torch_backend", "reference_joint_attention", "sdpa_with_lse", "_split_backend"):
        monkeypatch.setattr(attention, name, ran)


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: b.__name__[len("_break_"):])
@fuzz(N_INVALID_EACH)
@given(st.data())
def test_invalid_arguments_raise_naming_the_argument_before_anything_runs(tripwires, breaker, data):
    q, k, v, text_slice, kwargs = data.draw(problems())
    args = dict(q=q, k=k, v=v, text_slice=text_slice, kwargs=dict(kwargs))
    named, exc = breaker(data.draw, args)
    event(f"{named}: {exc}")  # pytest --hypothesis-show-statistics
    with pytest.raises(exc) as info:
        joint_attention(args["q"], args["k"], args["v"], args["text_slice"], **args["kwargs"])
    assert named in str(info.value), (breaker.__name__, str(info.value))


def test_tripwires_fire_when_a_backend_runs(tripwires):
    # the check above can fail: a valid call reaches a backend and trips
    q, k, v = (torch.randn(1, 1, 5, 4) for _ in range(3))
    for backend in ("torch", "reference"):
        with pytest.raises(AssertionError, match="a backend ran"):
            joint_attention(q, k, v, (0, 2), backend=backend)
