"""The README table of diffusers transformers (seg4diff_fast/capture/README.md) is what the survey tool computes
from the installed diffusers: every module listed, attention call and mask columns read from the source, the
capture column from ADAPTERS and the refusals. The family tables of that README and of docs/02-capture.md are what
the tool generates from the family records (seg4diff_fast/capture/families/)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import survey_transformers as survey  # noqa: E402


import pytest  # noqa: E402


@pytest.mark.parametrize("path, start, end, make", survey.TABLES,
                         ids=[f"{os.path.basename(t[0])}:{t[3].__name__}" for t in survey.TABLES])
def test_committed_tables_are_the_generated_ones(path, start, end, make):
    assert survey.committed(path, start, end) == make(), (
        "regenerate: PYTHONPATH=. python tools/survey_transformers.py --update-readme")


def test_family_table_has_a_row_per_record():
    from seg4diff_fast.capture.families import FAMILIES

    rows = survey.families_markdown().splitlines()[2:]
    assert len(rows) == len(FAMILIES)
    assert all(any(f"`{p.rpartition('.')[2]}`" in row for row in rows) for f in FAMILIES for p in f.transformers)


def test_every_module_is_classified_and_the_families_read_from_source_are_right():
    modules = survey.survey()
    assert set(modules) == set(survey.KNOWN)  # a new diffusers module must be read and added by hand
    assert modules["transformer_flux"]["dispatch"] and not modules["transformer_flux"]["sdpa"]
    assert modules["transformer_cogview4"]["sdpa"] and modules["transformer_cogview4"]["mask"]
    assert not modules["transformer_sd3"]["dispatch"]  # SD3's processor lives in attention_processor.py
    assert "QwenImageTransformer2DModel" in modules["transformer_qwenimage"]["models"]
    assert sum(m["dispatch"] for m in modules.values()) >= 40


def test_segmentation_table_has_a_row_per_segment_record():
    """docs/03-segmentation.md's table: one row per record with a ``segment``, its pipelines and its columns text."""
    from seg4diff_fast.capture.families import FAMILIES

    rows = survey.segmentation_markdown().splitlines()[2:]
    records = [f for f in FAMILIES if f.segment is not None]
    assert len(rows) == len(records)
    for f, row in zip(records, rows):
        assert row.startswith(f"| `{f.family}`") and f.segment.columns and f.segment.columns in row
        assert all(f"`{p}`" in row for p in f.segment.pipelines)
