"""eval: resume keyed on the settings, kill-and-resume equal to an uninterrupted run, per-sample claims shared by
several runs, bad samples recorded without ending the run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seg4diff_fast._io import HOST
from seg4diff_fast.segmentation.datasets import open_dataset
from seg4diff_fast.segmentation.evaluate import ResumeError, evaluate
from test_metrics import FakeSegmenter, make_voc

TESTS = os.path.dirname(__file__)


class SettingsSegmenter(FakeSegmenter):
    """FakeSegmenter with settings, as a Segmenter has: they go into the fingerprint."""

    def __init__(self, seed=0, **kw):
        super().__init__(**kw)
        self.seed = seed

    def settings(self):
        return {"model": "fake", "protocol": {"seed": self.seed, "layers": [9]}}


def _comparable(summary):
    return {k: v for k, v in summary.items() if k != "seconds_per_image"}


@pytest.fixture()
def voc(tmp_path):
    make_voc(tmp_path / "voc", n=6)
    return open_dataset("voc20", str(tmp_path / "voc"))


def test_changed_settings_are_refused_then_overwritten(voc, tmp_path):
    out = str(tmp_path / "out")
    evaluate(SettingsSegmenter(), voc, out, protocol="gt", progress=False)
    for seg, protocol, what in [(SettingsSegmenter(), "full", "protocol"),
                                (SettingsSegmenter(seed=1), "gt", "segmenter.protocol.seed")]:
        again = seg
        with pytest.raises(ResumeError, match=what):
            evaluate(again, voc, out, protocol=protocol, progress=False)
        assert again.calls == 0  # refused before any compute
    renamed = open_dataset("voc20", str(tmp_path / "voc"))
    renamed.classes = [c.upper() for c in renamed.classes]
    with pytest.raises(ResumeError, match="classes"):
        evaluate(SettingsSegmenter(), renamed, out, protocol="gt", progress=False)
    fresh = SettingsSegmenter()
    s = evaluate(fresh, voc, out, protocol="full", progress=False, overwrite=True)
    assert fresh.calls == 6 and s["protocol"] == "full" and s["counts"]["done"] == 6
    assert json.load(open(os.path.join(out, "run.json")))["settings"]["protocol"] == "full"


def test_results_without_settings_are_refused(voc, tmp_path):
    out = tmp_path / "old"
    (out / "per_image").mkdir(parents=True)
    (out / "per_image" / "x.npz").write_bytes(b"old")
    with pytest.raises(ResumeError, match="without a run.json"):
        evaluate(SettingsSegmenter(), voc, str(out), progress=False)


def test_summary_records_settings_and_counts(voc, tmp_path):
    s = evaluate(SettingsSegmenter(), voc, str(tmp_path / "o"), progress=False)
    assert s["model"] == "fake" and s["dataset"] == "voc20" and s["split"] == "val"
    assert s["settings"]["segmenter"]["protocol"]["seed"] == 0 and len(s["fingerprint"]) == 64
    assert s["counts"] == {"done": 6, "failed": 0, "skipped": 0}


@settings(max_examples=8, deadline=None)
@given(k=st.integers(0, 5), protocol=st.sampled_from(["gt", "full"]))
def test_exception_after_k_samples_then_resume_equals_one_run(tmp_path_factory, k, protocol):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, n=6)
    ds = open_dataset("voc20", str(root))
    whole = evaluate(SettingsSegmenter(), ds, str(root / "whole"), protocol=protocol, progress=False)
    out = str(root / "broken")
    with pytest.raises(KeyboardInterrupt):
        evaluate(SettingsSegmenter(fail_after=k), ds, out, protocol=protocol, progress=False)
    assert not [f for f in os.listdir(os.path.join(out, "per_image")) if f.endswith(".lock")]  # released
    rest = SettingsSegmenter()
    resumed = evaluate(rest, ds, out, protocol=protocol, progress=False)
    assert rest.calls == 6 - k
    assert _comparable(resumed) == _comparable(whole)


KILL_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[3])
from test_eval_resume import SettingsSegmenter
from seg4diff_fast.segmentation.datasets import open_dataset
from seg4diff_fast.segmentation.evaluate import evaluate

class Slow(SettingsSegmenter):
    def segment(self, image, classes, **kw):
        time.sleep(float(sys.argv[4]))
        return super().segment(image, classes, **kw)

seg = Slow()
evaluate(seg, open_dataset("voc20", sys.argv[1]), sys.argv[2], protocol="gt", progress=False)
print("calls", seg.calls)
"""


def _start(root, out, delay):
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), str(out), TESTS, str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_at_random_points_then_resumed_equals_one_run(tmp_path):
    """A process killed (SIGKILL: no cleanup at all) at random moments, several times, then resumed: the summary
    is the uninterrupted run's; the dead process's lock is taken over, its temporary files removed."""
    make_voc(tmp_path / "voc", n=8)
    ds = open_dataset("voc20", str(tmp_path / "voc"))
    whole = evaluate(SettingsSegmenter(), ds, str(tmp_path / "whole"), progress=False)
    out = tmp_path / "killed"
    rng = random.Random(1234)
    for _ in range(3):
        p = _start(tmp_path / "voc", out, 0.15)
        t0 = time.time()
        while not (out / "run.json").exists() and time.time() - t0 < 60:  # started evaluating
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # then a sample every 0.15 s: killed mid-sample or mid-write
        p.send_signal(signal.SIGKILL)
        p.wait()
    # a leftover of a dead writer, as a kill during a write leaves it
    (out / "per_image").mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "per_image" / f".tmp-{HOST}-{dead.pid}-x.npz").write_bytes(b"half")
    first = sorted(s.id for s in ds.samples)[0]
    if not (out / "per_image" / f"{first}.npz").exists():  # a lock the dead process held
        (out / "per_image" / f"{first}.lock").write_text(json.dumps({"pid": dead.pid, "host": HOST, "time": 0}))
    seg = SettingsSegmenter()
    resumed = evaluate(seg, ds, str(out), progress=False)
    assert resumed["counts"] == {"done": 8, "failed": 0, "skipped": 0}
    assert _comparable(resumed) == _comparable(whole)
    left = [f for f in os.listdir(out / "per_image") if not f.endswith(".npz")]
    assert left == [], left


def test_two_runs_share_one_folder_without_computing_twice(tmp_path):
    make_voc(tmp_path / "voc", n=8)
    out = tmp_path / "shared"
    procs = [_start(tmp_path / "voc", out, 0.1) for _ in range(2)]
    calls = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e[-2000:]
        calls.append(int(o.split()[-1]))
    assert sum(calls) == 8  # every sample computed exactly once
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["done"] + s["counts"]["skipped"] == 8  # the first to finish may see the other's claims


def test_live_and_foreign_locks_are_respected(voc, tmp_path):
    out = tmp_path / "o"
    (out / "per_image").mkdir(parents=True)
    ids = [s.id for s in voc.samples]
    (out / "per_image" / f"{ids[0]}.lock").write_text(json.dumps({"pid": os.getpid(), "host": HOST, "time": 0}))
    (out / "per_image" / f"{ids[1]}.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
    seg = SettingsSegmenter()
    s = evaluate(seg, voc, str(out), progress=False)
    assert seg.calls == 4 and s["counts"] == {"done": 4, "failed": 0, "skipped": 2}
    assert set(s["skipped"]) == {ids[0], ids[1]}


def test_bad_samples_are_recorded_and_the_run_goes_on(tmp_path):
    ids = make_voc(tmp_path / "voc", n=6)
    root = tmp_path / "voc"
    lab = np.array(Image.open(root / "SegmentationClass" / f"{ids[1]}.png"))
    lab[3, 3] = 40  # VOC has 20 classes
    Image.fromarray(lab).save(root / "SegmentationClass" / f"{ids[1]}.png")
    Image.new("RGB", (5, 5)).save(root / "JPEGImages" / f"{ids[2]}.jpg")  # size differs from its label
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"not a jpeg")
    os.unlink(root / "SegmentationClass" / f"{ids[4]}.png")
    ds = open_dataset("voc20", str(root))
    seg = SettingsSegmenter()
    s = evaluate(seg, ds, str(tmp_path / "o"), progress=False)
    assert s["counts"] == {"done": 2, "failed": 4, "skipped": 0} and seg.calls == 2
    reasons = {f["id"]: f["reason"] for f in s["failed"]}
    assert "outside the 20 classes" in reasons[ids[1]]
    assert "differ in size" in reasons[ids[2]]
    assert "UnidentifiedImageError" in reasons[ids[3]] or "cannot identify" in reasons[ids[3]]
    assert "No such file" in reasons[ids[4]] or "not found" in reasons[ids[4]]
    assert all(f["image"].endswith(".jpg") and f["label"].endswith(".png") for f in s["failed"])
    # repaired, a rerun computes only the repaired sample
    Image.new("RGB", (16, 12)).save(root / "JPEGImages" / f"{ids[2]}.jpg")
    again = SettingsSegmenter()
    s = evaluate(again, ds, str(tmp_path / "o"), progress=False)
    assert again.calls == 1 and s["counts"] == {"done": 3, "failed": 3, "skipped": 0}


# -- results belong to the data they came from (issue 19) --------------------------------------------------------

def _folder_dataset(root, seed, n=3, h=12, w=16):
    """A `folder` dataset: images/<id>.png, labels/<id>.png (uncompressed: a label's size in bytes depends on its
    shape only), classes.txt. ``seed`` picks the pixels and the labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    (root / "classes.txt").write_text("cat\ndog\nsky\n")
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(root / "labels" / f"s{i}.png",
                                                                          compress_level=0)
    return root


def _fresh(root, tmp_path, name):
    return evaluate(SettingsSegmenter(), open_dataset("folder", str(root)), str(tmp_path / name), progress=False)


def test_another_dataset_of_the_same_name_is_refused_or_recomputed(tmp_path):
    one, two = _folder_dataset(tmp_path / "one" / "data", 0), _folder_dataset(tmp_path / "two" / "data", 1)
    out = str(tmp_path / "out")
    first = evaluate(SettingsSegmenter(), open_dataset("folder", str(one)), out, progress=False)
    expected = _fresh(two, tmp_path, "fresh")
    assert first["confusion"] != expected["confusion"]
    # the same name, the same file names, another folder: refused before any work, naming the root
    seg = SettingsSegmenter()
    with pytest.raises(ResumeError, match=r"root: .*one/data.* then, .*two/data.* now"):
        evaluate(seg, open_dataset("folder", str(two)), out, progress=False)
    assert seg.calls == 0
    # the other dataset copied over the first one's folder (same root, other files): every sample computed again
    shutil.rmtree(one)
    shutil.copytree(two, one)
    seg = SettingsSegmenter()
    with pytest.warns(UserWarning, match="computed from other data"):
        again = evaluate(seg, open_dataset("folder", str(one)), out, progress=False)
    assert seg.calls == 3
    assert again["confusion"] == expected["confusion"] and again["mIoU"] == expected["mIoU"]


@pytest.mark.parametrize("what", ["labels", "images"])
def test_a_file_edited_in_place_is_recomputed(tmp_path, what):
    root = _folder_dataset(tmp_path / "data", 0)
    out = str(tmp_path / "out")
    evaluate(SettingsSegmenter(), open_dataset("folder", str(root)), out, progress=False)
    path = root / what / "s1.png"
    st = os.stat(path)
    if what == "labels":  # other classes, the same size in bytes and the same mtime: only the content differs
        lab = np.array(Image.open(path))
        Image.fromarray(((lab + 1) % 3).astype(np.uint8)).save(path, compress_level=0)
    else:  # another shape: the label no longer fits
        Image.new("RGB", (5, 5)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert what == "images" or os.path.getsize(path) == st.st_size
    seg = SettingsSegmenter()
    with pytest.warns(UserWarning, match=r"s1\.npz was computed from other data: its " + what[:-1]):
        s = evaluate(seg, open_dataset("folder", str(root)), out, progress=False)
    assert seg.calls == (1 if what == "labels" else 0)
    if what == "labels":
        assert _comparable(s) == _comparable(_fresh(root, tmp_path, "fresh"))
    else:  # recomputed, and now it fails (sizes differ): no old result left for it
        assert s["counts"] == {"done": 2, "failed": 1, "skipped": 0} and "differ in size" in s["failed"][0]["reason"]
        assert not os.path.exists(os.path.join(out, "per_image", "s1.npz"))
        assert not os.path.exists(os.path.join(out, "pred", "s1.png"))


def test_a_touched_but_equal_file_is_kept(tmp_path):
    root = _folder_dataset(tmp_path / "data", 0)
    out = str(tmp_path / "out")
    first = evaluate(SettingsSegmenter(), open_dataset("folder", str(root)), out, progress=False)
    data = (root / "labels" / "s0.png").read_bytes()
    (root / "labels" / "s0.png").write_bytes(data)  # rewritten, the same bytes: new mtime and ctime
    os.utime(root / "images" / "s2.png")
    seg = SettingsSegmenter()
    again = evaluate(seg, open_dataset("folder", str(root)), out, progress=False)
    assert seg.calls == 0 and _comparable(again) == _comparable(first)


def test_merge_refuses_a_result_of_other_data(tmp_path):
    from seg4diff_fast.segmentation.evaluate import merge_results

    root = _folder_dataset(tmp_path / "data", 0)
    out = str(tmp_path / "out")
    evaluate(SettingsSegmenter(), open_dataset("folder", str(root)), out, progress=False)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "labels" / "s2.png")
    with pytest.raises(ResumeError, match=r"s2\.npz was computed from other data.*rerun the evaluation"):
        merge_results(out, open_dataset("folder", str(root)))


# -- corrupt result files are named, and per-sample ones recomputed (issue 19) ---------------------------------

@pytest.mark.parametrize("damage", ["empty", "cut", "garbage"])
def test_a_corrupt_per_image_result_is_named_and_recomputed(voc, tmp_path, damage):
    from seg4diff_fast.segmentation.evaluate import merge_results

    out = tmp_path / "o"
    whole = evaluate(SettingsSegmenter(), voc, str(out), progress=False)
    sid = voc.samples[2].id
    path = out / "per_image" / f"{sid}.npz"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "cut": data[: len(data) // 2], "garbage": b"PK\x03\x04" + b"x" * 40}[damage])
    with pytest.raises(ResumeError, match=rf"{sid}\.npz cannot be read"):
        merge_results(str(out), voc)
    seg = SettingsSegmenter()
    with pytest.warns(UserWarning, match=rf"recomputing {sid}: .*{sid}\.npz cannot be read"):
        again = evaluate(seg, voc, str(out), progress=False)
    assert seg.calls == 1 and _comparable(again) == _comparable(whole)


@pytest.mark.parametrize("content", ["", '{"fingerprint": "ab', "[]"])
def test_an_unreadable_run_json_is_named(voc, tmp_path, content):
    out = tmp_path / "o"
    evaluate(SettingsSegmenter(), voc, str(out), progress=False)
    (out / "run.json").write_text(content)
    seg = SettingsSegmenter()
    with pytest.raises(ResumeError, match=r"run\.json.*(empty|not valid JSON|no fingerprint).*overwrite"):
        evaluate(seg, voc, str(out), progress=False)
    assert seg.calls == 0
    s = evaluate(seg, voc, str(out), progress=False, overwrite=True)
    assert seg.calls == 6 and s["counts"]["done"] == 6


def test_a_cut_failure_record_is_still_a_failure(tmp_path):
    ids = make_voc(tmp_path / "voc", n=3)
    os.unlink(tmp_path / "voc" / "SegmentationClass" / f"{ids[1]}.png")
    ds = open_dataset("voc20", str(tmp_path / "voc"))
    out = tmp_path / "o"
    evaluate(SettingsSegmenter(), ds, str(out), progress=False)
    (out / "failed" / f"{ids[1]}.json").write_text('{"id": ')
    from seg4diff_fast.segmentation.evaluate import merge_results

    s = merge_results(str(out), ds)
    assert s["counts"] == {"done": 2, "failed": 1, "skipped": 0}
    assert "unreadable record" in s["failed"][0]["reason"] and f"{ids[1]}.json" in s["failed"][0]["reason"]


@pytest.mark.parametrize("content", ["", '{"pid": ', '{"pid": "x", "host": 3}'])
def test_an_unreadable_lock_is_taken_over_once_old(voc, tmp_path, content):
    """A lock cut by a kill while it was written (empty or half JSON) is respected while it may be being written,
    and taken over once it has stayed unreadable for a minute: never a sample skipped forever."""
    out = tmp_path / "o"
    (out / "per_image").mkdir(parents=True)
    sid = voc.samples[0].id
    lock = out / "per_image" / f"{sid}.lock"
    lock.write_text(content)
    seg = SettingsSegmenter()
    s = evaluate(seg, voc, str(out), progress=False)
    assert seg.calls == 5 and s["skipped"] == [sid]  # fresh: perhaps a writer between create and write
    old = time.time() - 3600
    os.utime(lock, (old, old))
    seg = SettingsSegmenter()
    s = evaluate(seg, voc, str(out), progress=False)
    assert seg.calls == 1 and s["counts"] == {"done": 6, "failed": 0, "skipped": 0} and not lock.exists()


def test_a_label_written_while_its_sample_is_evaluated_fails_that_sample(tmp_path):
    """The files are recorded before scoring; one written meanwhile fails the sample (retried by a rerun) rather
    than leaving a result recorded under content it was not computed from."""
    root = _folder_dataset(tmp_path / "data", 0)

    class Editing(SettingsSegmenter):
        def segment(self, image, classes, **kw):
            if image.endswith("s1.png") and self.calls == 1:
                lab = root / "labels" / "s1.png"
                Image.fromarray(np.zeros((12, 16), np.uint8)).save(lab, compress_level=0)
                os.utime(lab, ns=(0, 0))
            return super().segment(image, classes, **kw)

    s = evaluate(Editing(), open_dataset("folder", str(root)), str(tmp_path / "out"), progress=False)
    assert s["counts"] == {"done": 2, "failed": 1, "skipped": 0}
    assert "changed while it was evaluated" in s["failed"][0]["reason"]
    seg = SettingsSegmenter()
    again = evaluate(seg, open_dataset("folder", str(root)), str(tmp_path / "out"), progress=False)
    assert seg.calls == 1 and _comparable(again) == _comparable(_fresh(root, tmp_path, "fresh"))


@pytest.mark.parametrize("classes", [[], ["cat", ""], ["cat", "Cat"]])
def test_a_dataset_of_bad_class_names_is_refused_before_any_sample(tmp_path, classes):
    """evaluate() of a dataset with no class names ran the model on every sample, each recorded as failed, and
    returned an mIoU of nan (hostile round, issue 19): refused first, nothing written."""
    from seg4diff_fast.segmentation.datasets import Sample, SegDataset

    class NeverCalled:
        def segment(self, *a, **k):
            raise AssertionError("no sample may run")

    ds = SegDataset("mine", [Sample("a", str(tmp_path / "a.png"), str(tmp_path / "a_label.png"))], classes,
                    lambda x: x)
    with pytest.raises(ValueError, match="mine: classes"):
        evaluate(NeverCalled(), ds, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
