"""Class names in a free prompt (``generate``, MAGNET's captions) -> character spans -> text columns: one rule
(``tokens.name_spans`` + ``tokens.span_columns``) for every family's tokenisation and for MAGNET.

The rule: whole words, any case, any whitespace between a name's words; longer names first; each character of the
prompt belongs to one class at most; every occurrence counts; a token is a column of one class at most.
"""
import json
import os
import subprocess
import sys

import pytest

from seg4diff_fast.segmentation.segmenter import TINY_MODELS, TINY_PIPELINES, Segmenter
from seg4diff_fast.segmentation.tiny import tiny_clip_tokenizer, tiny_pipeline, tiny_t5_tokenizer
from seg4diff_fast.segmentation.tokens import name_spans, phrase_columns, span_columns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a traffic light near a light pole"


@pytest.mark.parametrize("names", [["light", "traffic light"], ["traffic light", "light"]])
def test_longer_name_takes_its_words_first_in_either_order(names):
    spans = dict(zip(names, name_spans(PROMPT, names)))
    assert spans == {"traffic light": [(2, 15)], "light": [(23, 28)]}


def test_every_occurrence_any_case_and_spacing_whole_words_only():
    text = "A Traffic  Light, a light; LIGHT and a lighthouse, traffic lights"
    spans = name_spans(text, ["light", "traffic light", "Light "])
    assert spans[1] == [(2, 16)]  # two spaces inside the name, capitals
    assert spans[0] == [(20, 25), (27, 32)]  # not "lighthouse", not "lights", not the one inside "traffic light"
    assert spans[2] == spans[0]  # the same name (case, spaces) gets the same spans
    assert name_spans("a cat", ["dog", "cat"]) == [[], [(2, 5)]]


def test_same_length_names_and_overlapping_occurrences():
    # equal lengths: the given order decides; a blocked match does not hide an overlapping free one
    assert name_spans("a b c", ["a b", "b c"]) == [[(0, 3)], []]
    assert name_spans("zz ab ab ab", ["zz ab", "ab ab"]) == [[(0, 5)], [(6, 11)]]


def test_span_columns_one_class_per_token():
    # offsets of 3 tokens; a token across two classes' spans goes to the one it overlaps most, never to both
    offsets = [(0, 0), (0, 4), (4, 9), (9, 12), (0, 0)]
    assert span_columns(offsets, [(0, 5), [(5, 12)]]) == [[1], [2, 3]]
    assert span_columns(offsets, [None, [(0, 4), (9, 12)]]) == [[], [1, 3]]


def _tokenizers():
    return {"clip": tiny_clip_tokenizer(), "t5": tiny_t5_tokenizer()}


@pytest.mark.parametrize("which", ["clip", "t5"])
@pytest.mark.parametrize("names", [["light", "traffic light"], ["traffic light", "light"]])
def test_plain_tokenizers_read_the_right_words(which, names):
    tok = _tokenizers()[which]
    text = PROMPT + " and a light"
    cols = phrase_columns(tok, text, name_spans(text, names), 77)
    ids = tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = {n: [tok.decode([ids[j]]).strip().replace("▁", "") for j in c] for n, c in zip(names, cols)}
    assert "".join(got["traffic light"]) == "trafficlight"
    assert "".join(got["light"]) == "lightlight"  # both free occurrences, not the one in "traffic light"
    light, traffic = cols[names.index("light")], cols[names.index("traffic light")]
    assert not set(light) & set(traffic) and min(light) > max(traffic[:len(traffic) // 2 + 1])


def _tiny_segmenters():
    families = sorted(set(TINY_PIPELINES.get(m, TINY_MODELS[m]) for m in TINY_MODELS if m != "tiny"))
    return families


@pytest.mark.parametrize("pipeline", _tiny_segmenters())
def test_every_family_layout_gives_each_occurrence_to_one_class(pipeline):
    """Each tiny family's own text layout (chat templates, dropped prefixes, padding, piecewise tokenisation):
    a class's columns are the union of the columns of its occurrences read alone, classes share no column, and a
    name inside a longer one reads only its own occurrences."""
    family = {"flux2-dev": "flux2", "cogvideox1.5": "cogvideox"}.get(pipeline, pipeline)
    seg = Segmenter(tiny_pipeline(pipeline), family=family, size=32)
    text = PROMPT + ", a TRAFFIC light"
    for names in (["light", "traffic light"], ["traffic light", "light"]):
        spans = name_spans(text, names)
        cols = seg._columns(text, spans)
        for n, sp, c in zip(names, spans, cols):
            alone = sorted({j for s in sp for j in seg._columns(text, [s])[0]})
            assert c and c == alone, (pipeline, n, c, alone)
        assert not set(cols[0]) & set(cols[1]), pipeline
        assert len(spans[names.index("traffic light")]) == 2 and len(spans[names.index("light")]) == 1


def test_magnet_caption_spans_follow_the_rule():
    from seg4diff_fast.magnet.data import token_groups

    tok = tiny_clip_tokenizer()
    text = PROMPT + " and a light"
    spans = [sp or None for sp in name_spans(text, ["light", "traffic light", "dog"])]
    groups = token_groups(tok, [text], [spans], 77)[0]
    assert groups[2] == [] and len(groups[0]) == 2 and len(groups[1]) == 2
    assert not set(groups[0]) & set(groups[1])


def _python_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "seg4diff_fast.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("classes", ["light,traffic light", "traffic light,light"])
def test_generate_typed_overlapping_names(tmp_path, classes):
    out = tmp_path / "out"
    p = _python_cli(["generate", PROMPT, "--classes", classes, "--model", "tiny", "--gen-steps", "1", "--height",
                     "32", "--width", "32", "--no-heatmaps", "--out", str(out)], ROOT)
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    cols = dict(zip(summary["classes"], summary["meta"]["columns"]))
    tok = tiny_clip_tokenizer()
    ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok.decode([ids[j] for j in cols["traffic light"]]).replace(" ", "") == "trafficlight"
    assert cols["light"] == [len(tok(PROMPT.rsplit(" light", 1)[0])["input_ids"]) - 1]  # the second "light"


def test_generate_typed_name_only_inside_a_longer_one(tmp_path):
    p = _python_cli(["generate", "a traffic light", "--classes", "light,traffic light", "--model", "tiny",
                     "--gen-steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "o")], ROOT)
    assert p.returncode == 2, p.stderr
    assert "'light' does not occur in the prompt 'a traffic light' only inside the longer class name " \
           "['traffic light']" in p.stderr and "token limit" not in p.stderr
