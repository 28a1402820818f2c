"""seg4diff-fast check: the table and verdict, --json, --save and backend="auto" reading the table (a stale one
ignored), the first-use guard of the Triton backends (a failing or wrong kernel injected: auto falls back with one
warning; an explicit backend raises), and the command as typed in a shell."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import seg4diff_fast.attention as attention
import seg4diff_fast.kernels as kernels
from seg4diff_fast import check, joint_attention

selfcheck = sys.modules["seg4diff_fast.selfcheck"]  # `seg4diff_fast.check` is the function
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# B, H, N, D, text_start, text_stop: a tiny SD3-order shape (text last), fast in the interpreter too.
SHAPE = (1, 2, 57, 16, 48, 57)
FAST = dict(shape=SHAPE, repeats=1, verbose=False)


def test_table_and_verdict(capsys):
    report = check(shape=SHAPE, repeats=1, modes=["i2t-mean", "none"], dtypes=["float32", "bfloat16"])
    rows = report["rows"]
    assert [(r["dtype"], r["mode"], r["backend"]) for r in rows] == [
        (dtype, mode, backend) for dtype in ("float32", "bfloat16") for mode in ("i2t-mean", "none")
        for backend in ("sdpa", "torch")]
    assert report["ok"] and all(r["ok"] and r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["median_ms"] > 0 and r["sdpa_ms"] > 0 and r["ratio"] == pytest.approx(r["median_ms"] / r["sdpa_ms"])
        assert r["err_out"] <= 2 * 2e-2 and (r["err_maps"] is None) == (r["mode"] == "none")
    printed = capsys.readouterr().out
    assert "backend" in printed and "err maps" in printed and "x SDPA" in printed and "peak MB" in printed
    assert printed.strip().splitlines()[-1] == report["verdict"]
    assert report["verdict"].startswith("verdict: OK") and "8 of 8 rows pass" in report["verdict"]


def test_wrong_backend_fails_the_check(monkeypatch):
    real = attention._torch_backend

    def wrong(*args, **kwargs):  # maps scaled by 1.01: 1e-2 relative, far above MAP_TOL
        out, i2t, t2i = real(*args, **kwargs)
        return out, None if i2t is None else i2t * 1.01, t2i

    monkeypatch.setattr(attention, "_torch_backend", wrong)
    report = check(modes=["i2t-mean", "none"], **FAST)
    status = {r["mode"]: r["status"] for r in report["rows"]}
    assert status == {"i2t-mean": "mismatch", "none": "ok"}
    assert not report["ok"] and report["verdict"].startswith("verdict: FAIL") and "i2t-mean: mismatch" in report[
        "verdict"]


def test_json_rows(tmp_path):
    path = tmp_path / "check.json"
    report = check(modes=["both-all"], json_path=str(path), **FAST)
    doc = json.loads(path.read_text())
    assert doc["rows"] == report["rows"] and doc["verdict"] == report["verdict"] and doc["ok"] is True
    for key in ("device", "driver", "torch", "triton", "commit", "device_key"):
        assert key in doc["env"]
    assert doc["env"]["torch"] == torch.__version__
    row = doc["rows"][0]
    assert (row["batch"], row["heads"], row["n"], row["head_dim"], row["text_start"], row["text_stop"]) == SHAPE
    assert row["tol_out"] == [4e-5, 4e-5] and row["tol_maps"] == [1e-6, 1e-4]
    with pytest.raises(ValueError, match="json_path"):
        check(json_path=str(tmp_path), **FAST)


def test_save_then_auto_picks_from_the_table():
    mode = selfcheck.mode_key("i2t", "mean")
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], mode) == "sdpa"  # the rule
    check(backends=["torch"], modes=["i2t-mean"], save=True, **FAST)
    path = Path(selfcheck.table_path(selfcheck._device_name(CPU)))
    assert path.parent == Path(os.environ["XDG_CACHE_HOME"]) / "seg4diff-fast"
    table = json.loads(path.read_text())
    assert table["torch"] == torch.__version__ and {r["backend"] for r in table["rows"]} == {"torch"}
    # the table's passing backend for its key; the rule for keys it has no row of
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], mode) == "torch"
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "sdpa"
    assert attention._resolve_backend("auto", CPU, torch.float32, 32, mode) == "sdpa"
    # a second --save keeps the rows of the other keys
    check(backends=["triton-split"], interpret=True, modes=["none"], save=True, **FAST)
    assert {(r["mode"], r["backend"]) for r in json.loads(path.read_text())["rows"]} == {
        ("i2t-mean", "torch"), ("none", "triton-split")}
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "triton-split"
    # outside the interpreter a table's Triton backend cannot run on the CPU: the rule
    selfcheck._STATE.clear()
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "sdpa"
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_stale_table_is_ignored(monkeypatch):
    check(backends=["torch"], modes=["none"], save=True, **FAST)
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "torch"
    selfcheck._STATE.clear()
    monkeypatch.setattr(selfcheck, "_versions", lambda: dict(torch="2.99.0", triton=torch.__version__))
    assert selfcheck.load_table(selfcheck._device_name(CPU)) is None
    assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "sdpa"


def _qkv():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(SHAPE[:3] + (SHAPE[3],), generator=g) for _ in range(3))


def _auto_call(**kwargs):
    q, k, v = _qkv()
    return joint_attention(q, k, v, slice(SHAPE[4], SHAPE[5]), capture="i2t", map_dtype=torch.float32, **kwargs)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """auto's built-in rule names the fused Triton kernel, as on CUDA (here it runs in the interpreter)."""
    monkeypatch.setattr(selfcheck, "_builtin_rule", lambda device, dtype: "triton")


def test_guard_passes_a_good_kernel(pretend_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _auto_call()
    assert selfcheck._STATE[(str(CPU), torch.float32, SHAPE[3], "i2t-mean")][1] == "triton"
    assert list(selfcheck._SELF_TESTS.values()) == [None]


def test_guard_falls_back_from_a_failing_kernel(pretend_gpu, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(kernels, "joint_attention_fwd", fails)
    with pytest.warns(RuntimeWarning) as record:
        out, maps = _auto_call()
    assert len(record) == 1
    message = str(record[0].message)
    assert "'triton'" in message and "illegal memory access" in message and "seg4diff-fast check" in message
    assert "using 'sdpa'" in message
    ref_out, ref_maps = _auto_call(backend="torch")
    torch.testing.assert_close(out, ref_out, atol=4e-5, rtol=4e-5)
    torch.testing.assert_close(maps.i2t, ref_maps.i2t, atol=2e-6, rtol=2e-4)
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        _auto_call()
    with pytest.raises(RuntimeError, match="illegal memory access"):  # asked for explicitly: no fallback
        _auto_call(backend="triton")


def test_guard_falls_back_from_a_wrong_kernel_past_failing_ones(pretend_gpu, monkeypatch):
    """The fused kernel gives a wrong out and the capture kernel fails: on a GPU auto would go down to torch (the
    sdpa backend's capture phase is that kernel there); on the CPU the sdpa backend runs no Triton kernel (its
    capture is torch's), so it is not self-tested and auto stops there."""
    real = kernels.joint_attention_fwd

    def wrong(*args, **kwargs):
        out, i2t, t2i = real(*args, **kwargs)
        return out * 1.5, i2t, t2i

    def fails(*args, **kwargs):
        raise RuntimeError("triton compile error (injected)")

    monkeypatch.setattr(kernels, "joint_attention_fwd", wrong)
    monkeypatch.setattr(kernels, "capture_maps", fails)  # the sdpa backend's capture kernel
    with pytest.warns(RuntimeWarning) as record:
        _auto_call()
    assert len(record) == 1
    message = str(record[0].message)
    assert "'triton' (mismatch: out differs" in message and "'sdpa'" not in message.split("failed;")[0]
    assert "using 'sdpa'" in message
    _auto_call(backend="sdpa")  # the failing capture kernel is not on the CPU sdpa path


def test_cli_as_typed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "seg4diff_fast.cli", "check", "--shape", ",".join(map(str, SHAPE)), "--repeats",
           "1", "--modes", "i2t-mean", "--json", str(out), "--save"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "verdict: OK" in res.stdout and out.exists()
    assert list((tmp_path / "cache" / "seg4diff-fast").glob("auto-*.json"))
    bad = [sys.executable, "-m", "seg4diff_fast.cli", "check", "--interpret"]
    res = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "argument --interpret" in res.stderr and "TRITON_INTERPRET=1" in res.stderr


def test_auto_under_torch_compile_reads_no_file():
    """While tracing, auto takes the choice an eager call made for the key (here: the table's), else the rule."""
    q, k, v = _qkv()

    def fn(q, k, v):
        return joint_attention(q, k, v, slice(SHAPE[4], SHAPE[5]), capture="both", heads="all")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, maps = compiled(q, k, v)  # cold: the rule (sdpa on the CPU); no table read while tracing
    assert selfcheck._STATE == {}
    ref_out, ref_maps = fn(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(maps.t2i, ref_maps.t2i)
    assert selfcheck._STATE[(str(CPU), torch.float32, SHAPE[3], "both-all")][1] == "sdpa"


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="sdxl"), "model must be some of sd3, flux"),
    (dict(shape=(1, 2, 60, 16, 10, 20)), "shape: text_slice=\\(10, 20\\) must touch"),
    (dict(shape=(1, 2, 60, 300, 50, 60)), "shape: expected"),
    (dict(dtypes=["float64"]), "dtypes must be some of"),
    (dict(backends=["triton"]), "backends on cpu must be some of sdpa, torch"),
    (dict(modes=["i2t-all"]), "modes must be some of"),
    (dict(repeats=0), "repeats must be an integer >= 1"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "meta"), "device"),
])
def test_bad_arguments_refused_before_any_work(kwargs, match, monkeypatch):
    monkeypatch.setattr(selfcheck, "_cases", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match=match):
        check(verbose=False, **kwargs)


def test_unreadable_table_is_ignored_with_a_warning():
    path = Path(selfcheck.table_path(selfcheck._device_name(CPU)))
    path.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps(dict(version=1, rows=[{"backend": "sdpa"}]))):
        path.write_text(text)
        selfcheck._STATE.clear()
        with pytest.warns(UserWarning, match="ignoring the unreadable backend table"):
            assert attention._resolve_backend("auto", CPU, torch.float32, SHAPE[3], "none") == "sdpa"
