"""The repository's top-level ``kernels/`` folder never shadows the PyPI package ``kernels``, and is always ours as
``seg4diff_fast.kernels``: Python started in the repository root (``python -m pytest``, ``python -c``, a notebook),
an editable install, a normal install, a wheel, and under the Triton interpreter.

Each case is a subprocess started with ``-S`` (no site processing: no editable-install finder, no .pth files) and
an explicit ``PYTHONPATH``, so that what it finds is only what the case puts there: this interpreter's
site-packages as plain folders, a stand-in ``kernels`` distribution, a built wheel unpacked.
"""
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A temporary site-packages holding a stand-in for Hugging Face's ``kernels`` distribution (the name
    transformers and diffusers import ``CUDAProperties`` from)."""
    site = tmp_path_factory.mktemp("stand_in_site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\nfrom .sub import VALUE\n")
    (site / "kernels" / "sub.py").write_text("VALUE = 42\n")
    info = site / "kernels-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.0\n")
    return str(site)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The project built as a wheel (``pip wheel``) and unpacked: a normal install's files."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    ROOT], check=True, capture_output=True, timeout=300)
    (whl,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    site = out / "site"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        z.extractall(site)
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not hold a top-level kernels package"
    assert "seg4diff_fast/kernels/__init__.py" in names and "seg4diff_fast/kernels/capture.py" in names
    return str(site)


def run(code, *, path, cwd=ROOT, env=None):
    """Run ``code`` in ``python -S`` started in ``cwd`` with exactly ``path`` on PYTHONPATH; returns the
    CompletedProcess (stdout, stderr as text)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_kernels_from_the_root_gives_the_installed_package(stand_in):
    out = ok(run("""
        import kernels, kernels.sub
        print(kernels.__file__, kernels.CUDAProperties, kernels.VALUE, kernels.sub.__file__)
    """, path=[stand_in]))
    init, props, value, sub = out.split()
    assert init == os.path.join(stand_in, "kernels", "__init__.py")
    assert (props, value) == ("stand-in", "42")
    assert sub == os.path.join(stand_in, "kernels", "sub.py")


def test_import_kernels_from_the_root_without_it_installed_fails():
    result = run("import kernels", path=[])
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr
    # and it leaves nothing behind: a second try fails the same way, not with a half-made module
    out = ok(run("""
        import sys
        for _ in range(2):
            try:
                import kernels
            except ModuleNotFoundError as e:
                print(e.name, 'kernels' in sys.modules)
    """, path=[]))
    assert out.split() == ["kernels", "False"] * 2


def test_our_kernels_stay_ours_in_the_source_tree(stand_in):
    """The editable-install case without the editable finder (``-S``): seg4diff_fast found in the root, its
    kernels subpackage the root's kernels/ folder, beside the installed (stand-in) ``kernels``."""
    out = ok(run("""
        import kernels
        import seg4diff_fast, seg4diff_fast.kernels as ours
        from seg4diff_fast.kernels import capture
        print(seg4diff_fast.__file__, ours.__file__, capture.__name__, kernels.CUDAProperties)
    """, path=[stand_in, SITE]))
    pkg, ours, name, props = out.split()
    assert pkg == os.path.join(ROOT, "seg4diff_fast", "__init__.py")
    assert ours == os.path.join(ROOT, "kernels", "__init__.py")
    assert (name, props) == ("seg4diff_fast.kernels.capture", "stand-in")


def test_diffusers_and_transformers_import_from_the_root(stand_in):
    """What broke on a fresh machine: transformers' and diffusers' own ``import kernels`` from the repository
    root, with the real distribution when this environment has it, else the stand-in."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    out = ok(run("""
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: F401
        import transformers.integrations.hub_kernels  # noqa: F401
        import kernels, seg4diff_fast.kernels as ours
        print(kernels.__file__, ours.__file__)
    """, path=[SITE, stand_in]))
    theirs, ours = out.split()
    assert theirs != ours and ours == os.path.join(ROOT, "kernels", "__init__.py")


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_a_normal_install_from_a_wheel(wheel_site, stand_in, tmp_path, cwd):
    """The wheel unpacked into a site folder: from elsewhere everything comes from it; from the repository root
    the root's seg4diff_fast shadows it (Python puts the root first) and still finds its kernels."""
    where = ROOT if cwd == "root" else str(tmp_path)
    out = ok(run("""
        import kernels, seg4diff_fast, seg4diff_fast.kernels as ours
        print(seg4diff_fast.__file__, ours.__file__, kernels.CUDAProperties)
    """, path=[wheel_site, stand_in, SITE], cwd=where))
    pkg, ours, props = out.split()
    base = ROOT if cwd == "root" else wheel_site
    assert pkg == os.path.join(base, "seg4diff_fast", "__init__.py")
    assert ours == os.path.join(base, "kernels" if cwd == "root" else os.path.join("seg4diff_fast", "kernels"),
                                "__init__.py")
    assert props == "stand-in"


@pytest.mark.parametrize("where", ["root", "wheel"])
def test_the_kernels_run_under_the_triton_interpreter(wheel_site, stand_in, tmp_path, where):
    pytest.importorskip("triton")
    out = ok(run("""
        import torch, kernels
        from seg4diff_fast import joint_attention, reference_joint_attention
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(3))
        out, maps = joint_attention(q, k, v, text_slice=slice(30, 37), heads="all", map_dtype=torch.float32,
                                     backend="triton")
        ref, ref_i2t, _ = reference_joint_attention(q, k, v, 30, 37)
        print(float((out - ref).abs().max()), float((maps.i2t - ref_i2t).abs().max()), kernels.CUDAProperties)
    """, path=([wheel_site] if where == "wheel" else []) + [stand_in, SITE],
        cwd=ROOT if where == "root" else str(tmp_path), env={"TRITON_INTERPRET": "1"}))
    err_out, err_maps, props = out.split()
    assert float(err_out) < 1e-5 and float(err_maps) < 1e-6 and props == "stand-in"


def test_oldest_pins_are_setup_lower_bounds():
    """CI's oldest environment (.ci/oldest.txt) installs exactly setup.py's lower bounds (torch aside: only one CPU
    build is served, see setup.py), so that a lower bound is a version that passed."""
    import re

    from packaging.version import Version

    with open(os.path.join(ROOT, ".ci", "oldest.txt"), encoding="utf-8") as f:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9.]+)\s*$", f.read(), flags=re.M))
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        bounds = {}
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', f.read()):
            bounds.setdefault(name, set()).add(Version(version))
    assert set(bounds) - {"torch"} == set(pins), (sorted(bounds), sorted(pins))
    for name, version in pins.items():
        assert bounds[name] == {Version(version)}, (name, bounds[name], version)


@pytest.mark.parametrize("how", ["-m", "script"])
def test_cli_usage_errors_exit_2_however_it_is_started(how, tmp_path):
    """`python -m seg4diff_fast.cli` (and so `accelerate launch -m`) and the console script give the same one-line
    usage error and exit status 2 (under -m, cli.py also runs as __main__: one UsageError class all the same)."""
    argv = ["segment", "no-such-image.png", "--classes", "cat,cat", "--model", "tiny", "--out", str(tmp_path / "o")]
    if how == "-m":
        cmd = [sys.executable, "-m", "seg4diff_fast.cli", *argv]
    else:
        cmd = [sys.executable, "-c", "import sys; from seg4diff_fast.cli import main; sys.exit(main())", *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "UsageError" not in err[0], err
