"""Fast CPU tests of the benchmark tooling: the `bench` command, benchmarks/run.py, benchmarks/report.py and
the helpers they share (error check, OOM and unsupported rows, results schema, e2e at a scaled-down config)."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from seg4diff_fast import bench as bm

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    # The tooling's own --threads option sets this for the process; restore it for the other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """benchmarks/run.py --quick, once for the module: (path, parsed JSON)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("results") / "cpu-quick.json"
    try:
        rc = _load_script("run").main(["--quick", "--threads", "1", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out, encoding="utf-8") as f:
        return out, json.load(f)


def test_bench_quick_runs_and_prints(capsys, tmp_path, one_thread):
    path = tmp_path / "bench.json"
    rc = bm.main(["bench", "--quick", "--device", "cpu", "--repeats", "3", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    ours = "sdpa-capture-i2t-mean"  # what joint_attention(backend="auto") runs on the CPU
    for word in ("impl", "median ms", "p20-p80 ms", "peak mem", "max err", "full-map", ours, "sdpa-default",
                 "1 torch thread(s)", "3 interleaved rounds", "what ran:",
                 f"{ours} (ours: backend 'sdpa', what backend='auto' picks for float32 on cpu): joint_attention",
                 "CPU: the CPU flash kernel, then the maps in torch, a softmax over all keys per chunk of image rows",
                 "triton (ours-i2t-mean): skipped, no CUDA (Triton's interpreter is for tests",
                 "triton-split (split-i2t-mean): skipped, no CUDA",
                 "torch (torch-chunked): not asked for (--backend torch or --impls torch-chunked times it)",
                 f"verdict: {ours} is ", " full-map (per-round ratio p20-p80 ", "x over 3 interleaved rounds)",
                 "x less peak memory"):
        assert word in out, word
    doc = json.loads(path.read_text())
    bm.validate_results(doc)
    assert doc["torch_threads"] == 1  # --quick on the CPU: one thread unless --threads says otherwise
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {ours, "sdpa-default", "full-map"}
    shape = bm.command.CPU_QUICK_SHAPE
    for r in rows.values():
        assert (r["heads"], r["n_img"], r["n_txt"], r["head_dim"]) == (
            shape["heads"], shape["n_img"], shape["n_txt"], shape["head_dim"])
        assert r["status"] == "ok" and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["max_abs_err"] < 1e-3  # float32, maps in float16
        n = r["n_img"] + r["n_txt"]
        assert r["tflops"] == pytest.approx(4 * n**2 * r["head_dim"] * r["heads"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["peak_mem_bytes"] > 0  # CPU: measured through torch.profiler
    # The full-map path holds the [B, H, N, N] float32 scores and probabilities; ours never does.
    n = rows["full-map"]["n_img"] + rows["full-map"]["n_txt"]
    assert rows["full-map"]["peak_mem_bytes"] >= shape["heads"] * n * n * 4
    assert rows[ours]["peak_mem_bytes"] < rows["full-map"]["peak_mem_bytes"] / 2
    ratio = rows["full-map"]["peak_mem_bytes"] / rows[ours]["peak_mem_bytes"]
    assert f"{ratio:.1f}x less peak memory" in out
    head = doc["settings"]["headline"]
    assert head["ours"] == ours and head["memory_ratio"] == pytest.approx(ratio)
    assert head["speed_ratio_p20"] <= head["speed_ratio"] <= head["speed_ratio_p80"]
    assert doc["settings"]["backend"] == "sdpa" and doc["settings"]["timing"] == "interleaved rounds"


TINY = ["bench", "--device", "cpu", "--n-img", "20", "--n-txt", "5", "--heads", "1", "--head-dim", "16",
        "--repeats", "1"]


def test_bench_times_what_auto_picks(capsys, monkeypatch, one_thread):
    # Where torch has no CPU flash kernel with its lse, joint_attention's auto takes the torch backend: so does bench.
    import seg4diff_fast.attention as attention

    monkeypatch.setattr(attention, "_cpu_flash_with_lse", lambda: False)
    assert bm.main(TINY + ["--impls", "ours"]) == 0
    out = capsys.readouterr().out
    assert "torch-chunked (ours: backend 'torch', what backend='auto' picks for float32 on cpu)" in out
    assert "sdpa (sdpa-capture-i2t-mean): skipped, backend='sdpa' on the CPU needs SDPA's CPU flash kernel" in out


def test_bench_says_when_there_is_no_verdict(capsys, one_thread):
    assert bm.main(TINY + ["--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "ours-i2t-mean (sd3-like-img20-txt5): no CUDA (Triton's interpreter is for tests" in out
    assert "verdict: n/a (ours-i2t-mean did not run)" in out


def test_bench_json_path_is_checked_before_the_run(capsys, tmp_path, one_thread):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    existing = tmp_path / "old.json"
    existing.write_text("precious\n")
    for path, message in ((blocker / "out.json", "is a file"), (existing, "already exists; pass --overwrite")):
        assert bm.main(TINY + ["--impls", "sdpa-default", "--json", str(path)]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "--json" in err[0] and message in err[0], captured.err
        assert "shape:" not in captured.out  # refused before the benchmark ran
    assert existing.read_text() == "precious\n"
    assert bm.main(TINY + ["--impls", "sdpa-default", "--json", str(existing), "--overwrite"]) == 0
    bm.validate_results(json.loads(existing.read_text()))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []  # written through a rename


def test_time_interleaved_rotates_the_order_and_keeps_going_after_a_failure():
    order = []

    def call(name, fail_at=None):
        def fn():
            order.append(name)
            if len([x for x in order if x == name]) == fail_at:
                raise RuntimeError("boom")
        return fn

    times = bm.time_interleaved({"a": call("a"), "b": call("b", fail_at=2), "c": call("c")}, repeats=4)
    assert "".join(order) == "abc" + "bca" + "ca" + "ac"  # b failed in round 2 and was dropped
    assert len(times["a"]) == len(times["c"]) == 4 and isinstance(times["b"], RuntimeError)


def _row(impl, median, mem):
    return dict(impl=impl, median_ms=median, p20_ms=median, p80_ms=median, peak_mem_bytes=mem)


@pytest.mark.parametrize("full_times,verdict", [
    ([29, 30, 30, 31, 31], "3.0x faster than full-map (per-round ratio p20-p80 2.98x-3.10x over 5"),
    ([5, 5, 5, 5, 5], "2.0x slower than full-map"),
    ([8, 9, 10, 11, 12], "no clear difference in speed (1.00x) from full-map"),
])
def test_headline_verdict_from_the_per_round_ratios(full_times, verdict):
    ours_times = [10, 10, 10, 10, 10]
    line, figures = bm.command.headline(_row("ours", 10, 100), _row("full-map", 30, 750),
                                        {"ours": ours_times, "full-map": full_times})
    assert line.startswith("verdict: ours is ") and verdict in line and line.endswith(", 7.5x less peak memory")
    assert figures["memory_ratio"] == 7.5


def test_cpu_peak_memory_counts_what_a_call_holds():
    def make_two_and_free_one():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB, both alive: 6 MB peak
        del a
        return b

    result, peak = bm.peak_memory(make_two_and_free_one, CPU)
    assert result.shape == (500, 1000) and peak == 6_000_000


def test_bench_warns_that_interpreter_timings_mean_nothing(capsys, monkeypatch, one_thread):
    argv = ["bench", "--device", "cpu", "--threads", "1", "--n-img", "20", "--n-txt", "5", "--heads", "1",
            "--head-dim", "16", "--repeats", "1", "--impls", "sdpa-default"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bm.main(argv) == 0
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and "say nothing about GPU speed" in err
    monkeypatch.delenv("TRITON_INTERPRET")
    assert bm.main(argv) == 0
    assert "TRITON_INTERPRET" not in capsys.readouterr().err


def _option_actions(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _bench_parser():
    parser = argparse.ArgumentParser(prog="seg4diff-fast")
    return bm.register_commands(parser.add_subparsers())


def test_every_bench_option_help_shows_its_default():
    run_parser = {}

    def capture_parser(argv):  # benchmarks/run.py builds its parser inside parse_args
        real = argparse.ArgumentParser.parse_args

        def grab(self, args=None, namespace=None):
            run_parser["p"] = self
            return real(self, args, namespace)

        argparse.ArgumentParser.parse_args = grab
        try:
            _load_script("run").parse_args(argv)
        finally:
            argparse.ArgumentParser.parse_args = real

    capture_parser(["--quick"])
    for parser in (_bench_parser(), run_parser["p"]):
        missing = [a.option_strings[0] for a in _option_actions(parser) if "default" not in (a.help or "")]
        assert not missing, f"{parser.prog}: options without their default in --help: {missing}"


def test_bench_quick_help_says_what_quick_changes():
    # --quick on the CPU runs MORE interleaved rounds than the default (15, not 10) on one thread; its help said
    # "fewer repeats".
    (quick,) = [a for a in _option_actions(_bench_parser()) if a.option_strings == ["--quick"]]
    command = bm.command
    assert command.QUICK_REPEATS > 10
    assert "fewer" not in quick.help
    assert f"{command.QUICK_REPEATS} interleaved rounds" in quick.help
    assert f"{command.CPU_QUICK_THREADS} torch thread" in quick.help


BAD_BENCH_ARGS = [
    (["--n-img", "0"], "--n-img"), (["--n-txt", "-3"], "--n-txt"), (["--heads", "two"], "--heads"),
    (["--head-dim", "300"], "--head-dim"), (["--batch", "0"], "--batch"), (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"), (["--device", "tpu"], "--device"), (["--dtype", "float8"], "--dtype"),
    (["--backend", "cuda"], "--backend"), (["--impls", "nope"], "--impls"), (["--impls", ","], "--impls"),
    (["--n-imgs", "5"], "--n-imgs"),
]


@pytest.mark.parametrize("argv,flag", BAD_BENCH_ARGS + [(["--json", "."], "--json")] + (
    [] if torch.cuda.is_available() else [(["--device", "cuda"], "--device")]))
def test_bench_usage_error_is_one_line_naming_the_flag(capsys, argv, flag):
    try:
        code = bm.main(["bench", "--device", "cpu", *argv] if "--device" not in argv else ["bench", *argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "error" in lines[0], captured.err
    assert "shape:" not in captured.out  # refused before any work


@pytest.mark.parametrize("argv,flag", [
    (["--batches", "0"], "--batches"), (["--models", "sd4"], "--models"), (["--dtypes", "float8"], "--dtypes"),
    (["--impls", "nope"], "--impls"), (["--repeats", "0"], "--repeats"), (["--device", "tpu"], "--device"),
    (["--e2e-resolutions", "8"], "--e2e-resolutions"), (["--append", "--overwrite"], "--overwrite"),
])
def test_run_usage_error_is_one_line_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        _load_script("run").main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0], err


def test_run_never_overwrites_an_existing_file(capsys, tmp_path, one_thread):
    run = _load_script("run")
    out = tmp_path / "cpu.json"
    out.write_text("precious\n")
    argv = ["--quick", "--suite", "kernel", "--impls", "sdpa-default", "--dtypes", "float32", "--threads", "1",
            "--no-progress", "--out", str(out)]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "--append" in err
    assert out.read_text() == "precious\n"  # untouched
    assert run.main(["--merge", str(out), "--out", str(out)]) == 2  # refused before reading the inputs' rows
    assert out.read_text() == "precious\n"
    assert run.main(argv + ["--overwrite"]) == 0
    doc = json.loads(out.read_text())
    bm.validate_results(doc)
    assert {r["impl"] for r in doc["rows"]} == {"sdpa-default"}
    assert run.main(argv + ["--append"]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 2 * len(doc["rows"])


def test_bench_subcommand_in_package_cli(capsys):
    cli = pytest.importorskip("seg4diff_fast.cli")
    try:
        parser = cli.build_parser()
    except ModuleNotFoundError as e:  # another module's subcommands not there yet
        pytest.skip(f"seg4diff_fast.cli cannot build its parser yet: {e}")
    args = parser.parse_args(["bench", "--quick", "--device", "cpu", "--n-img", "30"])
    assert args.func is bm.run and args.quick and args.n_img == 30
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out


def test_run_quick_writes_valid_json(quick_results):
    path, doc = quick_results
    bm.validate_results(doc)
    assert doc["device_type"] == "cpu" and doc["torch_threads"] == 1 and doc["settings"]["quick"]
    kernel = [r for r in doc["rows"] if r["suite"] == "kernel"]
    # Every case has a row for every implementation of the table, run or not.
    assert {r["impl"] for r in kernel} == set(bm.IMPLS)
    by = {(r["case"], r["dtype"], r["impl"]): r for r in kernel}
    for (case, dtype, impl), r in by.items():
        if bm.unsupported_reason(bm.IMPLS[impl], CPU):
            assert r["status"] == "unsupported" and r["note"]
        else:
            assert r["status"] == "ok", r
            assert r["max_abs_err"] < (1e-3 if dtype == "float32" else 2e-2)
    e2e = [r for r in doc["rows"] if r["suite"] == "e2e"]
    assert {r["impl"] for r in e2e} == set(bm.E2E_PATHS)
    assert all(r["status"] == "ok" for r in e2e if r["impl"] in ("vae-encode", "plain"))


def test_report_renders_table_and_png(quick_results, tmp_path):
    path, doc = quick_results
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{_load_script('report').README_BEGIN}\nold\n{_load_script('report').README_END}\ntail\n")
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert _load_script("report").main([str(path), "--md", str(md), "--png", str(png), "--readme", str(readme)]) == 0
    text = md.read_text()
    assert "| case | dtype | B |" in text and "full-map" in text and "CPU" in text and "n/s" in text
    assert "Largest resolution" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = readme.read_text()
    assert "old" not in body and "tail" in body and "full-map" in body and "r.png" in body


def test_validate_rejects_bad_documents(quick_results):
    _, doc = quick_results
    for mutate in (lambda d: d.pop("torch"), lambda d: d["rows"][0].update(status="fast"),
                   lambda d: d["rows"][0].pop("median_ms"), lambda d: d.update(schema_version=99)):
        bad = copy.deepcopy(doc)
        mutate(bad)
        with pytest.raises(ValueError):
            bm.validate_results(bad)


def test_error_check_sees_a_wrong_row_and_a_wrong_map():
    case = bm.Case("t", None, 2, 3, 16, 9, 40, True, "float32")
    q, k, v = bm.make_inputs(case, CPU, seed=1)
    impl = bm.IMPLS["full-map"]
    out, i2t, _ = impl.fn(q, k, v, *case.text_range)
    assert max(bm.sampled_errors(case, impl, q, k, v, (out, i2t, None)).values()) < 1e-5
    img_rows, _ = bm.sample_rows(case)
    assert img_rows[0] == case.n_txt and img_rows[-1] == case.n - 1  # first and last image rows are checked
    bad = out.clone()
    bad[1, 2, case.n - 1] += 0.5  # last image row, last head, second batch entry
    assert bm.sampled_errors(case, impl, q, k, v, (bad, i2t, None))["out"] == pytest.approx(0.5, abs=1e-4)
    bad_map = i2t.clone()
    bad_map[1, -1, 0] += 0.25
    assert bm.sampled_errors(case, impl, q, k, v, (out, bad_map, None))["i2t"] == pytest.approx(0.25, abs=1e-4)


def test_oom_and_unsupported_rows(monkeypatch):
    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 66.00 GiB")

    def no_kernel(*_):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setitem(bm.IMPLS, "fake-oom", bm.Impl("fake-oom", oom, None, None, "", ""))
    monkeypatch.setitem(bm.IMPLS, "fake-nokernel", bm.Impl("fake-nokernel", no_kernel, None, None, "", ""))
    case = bm.quick_cases()[1]
    rows = bm.run_cases([case], ["fake-oom", "fake-nokernel", "sdpa-cudnn", "ours-i2t-mean"], CPU, progress=False)
    assert [r["status"] for r in rows] == ["oom", "unsupported", "unsupported", "unsupported"]
    assert "66.00 GiB" in rows[0]["note"] and rows[0]["median_ms"] is None


def test_matrix_of_issue_5():
    cases = bm.gpu_cases()
    assert len(cases) == 2 * 2 * (2 * 3 + 3)
    sd3 = {(c.n_txt, c.n_img) for c in cases if c.model == "sd3-medium"}
    assert sd3 == {(t, i) for t in (154, 333) for i in (4096, 16384, 36864)}
    flux = [c for c in cases if c.model == "flux1-dev"]
    assert {c.n_img for c in flux} == {4096, 16384, 65536}
    assert all(c.text_first and c.head_dim == 128 and c.text_range == (0, 512) for c in flux)
    c = next(c for c in cases if c.model == "sd3-medium" and c.n_img == 16384 and c.n_txt == 333 and c.batch == 1)
    assert c.text_range == (16384, 16717) and c.flops == pytest.approx(4 * 16717**2 * 64 * 24)


def test_configs_build_full_size_on_meta():
    pytest.importorskip("diffusers")
    expected = {"sd3_medium": 2.03e9, "flux1_dev": 11.9e9}
    for name, n_params in expected.items():
        cfg = bm.load_model_config(name)
        model = bm.build_transformer(cfg, torch.device("meta"), torch.float16)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(n_params, rel=0.01)
        assert len(model.transformer_blocks) > cfg["expert_layer"]
        assert model.config.num_attention_heads == 24


def test_e2e_scaled_down_forward(one_thread):
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    cfg = bm.scaled_down_config(bm.load_model_config("flux1_dev"))
    rows = bm.run_e2e(cfg, CPU, "float32", [64], repeats=1, paths=("plain", "ours"), progress=False)
    status = {r["impl"]: r for r in rows}
    assert status["plain"]["status"] == "ok" and status["plain"]["n_img"] == 16
    assert status["ours"]["status"] == "ok", status["ours"]


@pytest.mark.parametrize("name", ["sd3_medium", "flux1_dev"])
def test_e2e_full_map_memory_is_seg4diff_s_in_the_model_dtype(name, one_thread):
    # The e2e "full-map" path runs reference.full_map_attention at the expert layer in the model dtype (capture
    # backend "full-map"). At its peak that function holds two [B, H, N, N] tensors of the model dtype (the
    # scores and the scaled scores, then those and the probabilities: 2.00x B*H*N*N*itemsize measured on the
    # function alone); in the whole forward, plain's own peak covers a little of it. Measured extra peak over
    # plain at N = 1024 + 13, float16: 1.80x (SD3), 1.72x (Flux). Tolerance: 1.5x-2.1x. The float32 "reference"
    # backend that this path used before gave 5.9x (float32 scores and probabilities both held, plus copies).
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    cfg = bm.scaled_down_config(bm.load_model_config(name))
    rows = {r["impl"]: r for r in bm.run_e2e(cfg, CPU, "float16", [512], repeats=1, paths=("plain", "full-map"),
                                             progress=False)}
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    n = rows["full-map"]["n_img"] + rows["full-map"]["n_txt"]
    assert n == 1024 + 13
    nn_bytes = rows["full-map"]["batch"] * cfg["transformer"]["num_attention_heads"] * n * n * 2  # float16
    extra = (rows["full-map"]["peak_mem_bytes"] - rows["plain"]["peak_mem_bytes"]) / nn_bytes
    assert 1.5 <= extra <= 2.1, f"full-map's extra peak over plain is {extra:.2f}x B*H*N*N*2 bytes"


@pytest.mark.parametrize("name", ["sd3_medium", "flux1_dev"])
def test_e2e_full_map_maps_equal_ours(name):
    # The same maps as our capture (backend auto) within MAP_TOL, in a float32 model, where both paths compute
    # in float32. (In float16 / bfloat16 full-map's maps carry the model dtype's rounding of every score, as
    # Seg4Diff's own code does: relative differences up to 1.4e-3 / 1.2e-2 from ours at this shape, beyond MAP_TOL.)
    pytest.importorskip("diffusers")
    from seg4diff_fast.capture import capture_attention
    from seg4diff_fast.reference import MAP_TOL

    cfg = bm.scaled_down_config(bm.load_model_config(name))
    transformer = bm.build_transformer(cfg, CPU, torch.float32)
    inputs = bm.transformer_inputs(cfg, 128, 1, CPU, torch.float32)
    maps, outs = {}, {}
    for backend in ("auto", "full-map"):
        with torch.no_grad(), capture_attention(transformer, layers=[cfg["expert_layer"]], capture="i2t",
                                                heads="mean", map_dtype=torch.float32, backend=backend) as store:
            outs[backend] = transformer(**inputs)[0]
            (maps[backend],) = store.maps.values()
    assert maps["full-map"].shape == (1, 64, 13)
    atol, rtol = MAP_TOL[torch.float32]
    torch.testing.assert_close(maps["full-map"], maps["auto"], atol=atol, rtol=rtol)
    torch.testing.assert_close(outs["full-map"], outs["auto"], atol=1e-5, rtol=1e-5)


def test_triton_impls_under_the_interpreter(capsys, one_thread):
    # tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA; the table then runs the Triton kernel
    # at a tiny shape when asked to (--allow-interpret), and checks it against the float64 reference.
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    rc = bm.main(["bench", "--threads", "1", "--n-img", "40", "--n-txt", "7", "--heads", "2", "--head-dim", "16",
                  "--dtype", "float32", "--repeats", "1", "--allow-interpret",
                  "--impls", "ours-i2t-mean,ours-both-all,ours-nocap"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(" ok ") == 3, out


def test_run_merge_keeps_rows(quick_results, tmp_path):
    path, doc = quick_results
    out = tmp_path / "merged.json"
    assert _load_script("run").main(["--merge", str(path), str(path), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    bm.validate_results(merged)
    assert merged["rows"] == doc["rows"] + doc["rows"] and len(merged["settings"]["previous"]) == 1


def test_e2e_oom_row_and_largest_fit(monkeypatch, one_thread):
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    cfg = bm.scaled_down_config(bm.load_model_config("sd3_medium"))
    real = bm.time_events

    def oom_above_64px(fn, device, repeats=3):
        if oom_above_64px.resolution > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fn, device, repeats)

    rows = []
    for res in (64, 128):
        oom_above_64px.resolution = res
        monkeypatch.setattr(bm.e2e, "time_events", oom_above_64px)  # where run_e2e looks it up
        rows += bm.run_e2e(cfg, CPU, "float32", [res], repeats=1, paths=("plain",), progress=False)
    assert [r["status"] for r in rows] == ["ok", "oom"] and "simulated" in rows[1]["note"]
    table = _load_script("report").e2e_table(rows)
    assert "sd3-medium-tiny / plain: 64^2" in table and "OOM" in table
