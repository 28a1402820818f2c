"""Video files for ``segment_video`` / ``seg4diff-fast segment --video``: animated GIF, WebP and PNG decoded by PIL,
MP4 (and the other containers) by PyAV (the ``video`` extra); clear errors for what cannot be read, before any model
is loaded. Every file is written by the test itself."""
import builtins
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg4diff_fast.cli import main
from seg4diff_fast.segmentation.images import load_frames, read_video

# 8 colours: a GIF's palette holds them exactly, so its frames decode to the very pixels written
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
                    [250, 250, 250]], dtype=np.uint8)


def _frames(n=6, h=30, w=44, seed=1):
    """``[n, h, w, 3]`` uint8, every frame different (PIL merges equal consecutive GIF frames)."""
    rng = np.random.default_rng(seed)
    return COLOURS[rng.integers(0, len(COLOURS), (n, h, w))]


def _smooth(n=6, h=32, w=48):
    """``[n, h, w, 3]`` uint8 gradients that move: what a lossy codec keeps close."""
    y, x = np.mgrid[0:h, 0:w]
    out = [np.stack([(x * 5 + 20 * i) % 256, (y * 7) % 256, np.full_like(x, 40 * i % 256)], -1) for i in range(n)]
    return np.stack(out).astype(np.uint8)


def _save_pil(path, frames, **kw):
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=40, loop=0, **kw)


def _save_mp4(path, frames):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("suffix,kw", [(".gif", {}), (".webp", {"lossless": True}), (".png", {})])
def test_pil_animations_decode_exactly(tmp_path, suffix, kw):
    data = _frames()
    path = tmp_path / f"clip{suffix}"
    _save_pil(path, data, **kw)
    frames = read_video(str(path))
    assert len(frames) == 6
    px = load_frames(str(path))
    assert px.shape == (6, 3, 30, 44) and px.dtype == torch.float32
    torch.testing.assert_close(px, torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255)


def test_mp4_decodes_through_pyav(tmp_path):
    data = _smooth()
    path = tmp_path / "clip.mp4"
    _save_mp4(path, data)
    px = load_frames(str(path))
    assert px.shape == (6, 3, 32, 48)
    want = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
    assert (px - want).abs().mean() < 0.03  # lossy (4:2:0 chroma), but the same frames in the same order
    assert (px[1:] - want[:-1]).abs().mean() > 0.05  # not shifted by a frame


def test_unreadable_videos_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_frames(str(tmp_path / "missing.gif"), "IMAGE")
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(ValueError, match="not a video file"):
        load_frames(str(tmp_path / "notes.txt"), "IMAGE")
    for name in ("bad.gif", "bad.webp", "bad.mp4"):
        (tmp_path / name).write_bytes(os.urandom(600))
        if name.endswith(".mp4"):
            pytest.importorskip("av")
        with pytest.raises(ValueError, match="cannot decode"):
            load_frames(str(tmp_path / name), "IMAGE")

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ModuleNotFoundError("No module named 'av'", name="av")  # what Python raises
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match=r"seg4diff-fast\[video\]"):
        load_frames(str(tmp_path / "bad.mp4"), "IMAGE")


def run(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-cogvideox1.5", "tiny-hunyuanvideo15"])
def test_cli_segments_a_gif_file(tmp_path, capsys, model):
    """As typed in a shell: `seg4diff-fast segment clip.gif --video ...` -> OUT/clip/00000 ... one folder per frame,
    labels at the frame's size, each frame's summary naming the file and the frame's token frame."""
    import json

    path = tmp_path / "clip.gif"
    _save_pil(path, _frames())
    out = tmp_path / "out"
    rc = run(["segment", str(path), "--video", "--classes", "cat,sky", "--model", model, "--size", "32",
              "--out", str(out), "--no-heatmaps"])
    assert rc == 0, capsys.readouterr().err
    got = sorted(os.listdir(out / "clip"))
    assert got == [f"{i:05d}" for i in range(6)]
    for i, name in enumerate(got):
        lab = Image.open(out / "clip" / name / "labels.png")
        assert lab.size == (44, 30) and np.array(lab).max() < 2
        summary = json.loads((out / "clip" / name / "summary.json").read_text())
        assert summary["frame"] == i and summary["image"] == str(path)
        latent = 0 if i == 0 else (i - 1) // 4 + 1
        assert summary["meta"]["latent_frame"] == (latent // 2 if model == "tiny-cogvideox1.5" else latent)


def test_cli_segments_an_mp4_file_as_its_frames(tmp_path, capsys):
    """An MP4 segments to the same labels as the folder of its decoded frames."""
    av = pytest.importorskip("av")  # noqa: F841
    path = tmp_path / "clip.mp4"
    _save_mp4(path, _smooth())
    frames = tmp_path / "clip_frames"
    frames.mkdir()
    for i, f in enumerate(load_frames(str(path))):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(frames / f"{i:05d}.png")
    args = ["--video", "--classes", "cat,sky", "--model", "tiny-cogvideox", "--size", "32", "--no-heatmaps"]
    assert run(["segment", str(path), "--out", str(tmp_path / "a"), *args]) == 0, capsys.readouterr().err
    assert run(["segment", str(frames), "--out", str(tmp_path / "b"), *args]) == 0, capsys.readouterr().err
    got = sorted(os.listdir(tmp_path / "a" / "clip"))
    assert got == sorted(os.listdir(tmp_path / "b" / "clip_frames")) == [f"{i:05d}" for i in range(6)]
    for name in got:
        a = np.array(Image.open(tmp_path / "a" / "clip" / name / "labels.png"))
        b = np.array(Image.open(tmp_path / "b" / "clip_frames" / name / "labels.png"))
        np.testing.assert_array_equal(a, b)


def test_cli_refuses_unreadable_videos_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from seg4diff_fast.segmentation import commands

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(commands, "_build", no_model)
    (tmp_path / "bad.gif").write_bytes(os.urandom(600))
    rc = run(["segment", str(tmp_path / "bad.gif"), "--video", "--classes", "cat", "--model", "tiny-cogvideox",
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot decode" in err and "bad.gif" in err
    rc = run(["segment", str(tmp_path / "nothing.mp4"), "--video", "--classes", "cat", "--model", "tiny-cogvideox",
              "--out", str(tmp_path / "o")])
    assert rc == 2 and "no such file" in capsys.readouterr().err

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # what Python raises
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 100)
    rc = run(["segment", str(tmp_path / "clip.mp4"), "--video", "--classes", "cat", "--model", "tiny-cogvideox",
              "--out", str(tmp_path / "o")])
    assert rc == 2 and "seg4diff-fast[video]" in capsys.readouterr().err
