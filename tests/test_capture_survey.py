"""The README table of diffusers transformers (seg4diff_fast/capture/README.md) is what the survey tool computes
from the installed diffusers: every module listed, attention call and mask columns read from the source, the
capture column from ADAPTERS and the refusals."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import survey_transformers as survey  # noqa: E402


def _readme_table() -> str:
    text = open(survey.README, encoding="utf-8").read()
    return text[text.index(survey.START) + len(survey.START):text.index(survey.END)]


def test_readme_table_matches_the_installed_diffusers():
    assert _readme_table() == survey.markdown(), "regenerate: python tools/survey_transformers.py --update-readme"


def test_every_module_is_classified_and_the_families_read_from_source_are_right():
    modules = survey.survey()
    assert set(modules) == set(survey.KNOWN)  # a new diffusers module must be read and added by hand
    assert modules["transformer_flux"]["dispatch"] and not modules["transformer_flux"]["sdpa"]
    assert modules["transformer_cogview4"]["sdpa"] and modules["transformer_cogview4"]["mask"]
    assert not modules["transformer_sd3"]["dispatch"]  # SD3's processor lives in attention_processor.py
    assert "QwenImageTransformer2DModel" in modules["transformer_qwenimage"]["models"]
    assert sum(m["dispatch"] for m in modules.values()) >= 40
