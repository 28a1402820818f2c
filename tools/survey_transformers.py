"""Survey of diffusers' transformer modules for capture: which call attention how, and with what mask.

Reads the source of the installed diffusers (``diffusers/models/transformers/*.py``, by AST: nothing is
imported or built) and prints, per module: its model classes, whether its processors call
``dispatch_attention_fn`` or ``F.scaled_dot_product_attention``, and whether an attention call passes a mask
(an ``attn_mask=`` / ``attention_mask=`` argument that is not the constant ``None``). What a reader must judge
(joint or cross-attention, where the text sits) is in ``KNOWN`` below, written from reading each module;
``tests/test_capture_survey.py`` checks that the README table (``seg4diff_fast/capture/README.md``) is what
``python tools/survey_transformers.py --markdown`` prints for the installed diffusers (``--update-readme``
rewrites it). The family tables of that README, of ``docs/02-capture.md``, of ``docs/03-segmentation.md`` and the
front README's "Supported models" are generated from the family records (``seg4diff_fast/capture/families/``) by
:func:`families_markdown`, :func:`kinds_markdown`, :func:`segmentation_markdown` and :func:`models_markdown`,
rewritten by ``--update-readme`` too and checked by the same test.
"""
from __future__ import annotations

import argparse
import ast
import os
from typing import Dict, List, Tuple

__all__ = ["scan_module", "survey", "markdown", "families_markdown", "kinds_markdown", "models_markdown", "TABLES",
           "KNOWN"]


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return ""


def scan_module(path: str) -> dict:
    """``{"models": [class names], "dispatch": bool, "sdpa": bool, "mask": bool}`` of one module file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    models, dispatch, sdpa, mask = [], False, False, False
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
            if "ModelMixin" in bases and not node.name.startswith("_"):
                models.append(node.name)
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in ("dispatch_attention_fn", "scaled_dot_product_attention"):
                dispatch |= name == "dispatch_attention_fn"
                sdpa |= name == "scaled_dot_product_attention"
                for kw in node.keywords:
                    if kw.arg in ("attn_mask", "attention_mask") and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is None
                    ):
                        mask = True
                if len(node.args) >= 4 and not (isinstance(node.args[3], ast.Constant) and node.args[3].value is None):
                    mask = True
    return {"models": sorted(models), "dispatch": dispatch, "sdpa": sdpa, "mask": mask}


def transformers_dir() -> str:
    import diffusers

    return os.path.join(os.path.dirname(diffusers.__file__), "models", "transformers")


def survey() -> Dict[str, dict]:
    """``{module name: scan_module(...)}`` for every module of the installed diffusers' transformers."""
    root = transformers_dir()
    return {
        f[:-3]: scan_module(os.path.join(root, f))
        for f in sorted(os.listdir(root))
        if f.endswith(".py") and f != "__init__.py"
    }


# module -> (kind, text position in the joint sequence, note). kind: "joint" (text and image tokens in one
# attention), "cross" (image queries attend to text keys in a separate attention), "no text", "other" (not an
# image or video generator), "?" (not read by hand yet). Written from the diffusers 0.42 sources.
KNOWN: Dict[str, Tuple[str, str, str]] = {
    "ace_step_transformer": ("other", "", "music"),
    "auraflow_transformer_2d": ("joint", "start", "processor in attention_processor.py (SDPA); text = 8 register tokens + prompt"),
    "cogvideox_transformer_3d": ("joint", "start", ""),
    "consisid_transformer_3d": ("joint", "start", "CogVideoX processor; identity conditioning"),
    "dit_transformer_2d": ("no text", "", "class-conditional"),
    "dual_transformer_2d": ("cross", "", ""),
    "hunyuan_transformer_2d": ("cross", "", "HunyuanDiT"),
    "latte_transformer_3d": ("cross", "", ""),
    "lumina_nextdit2d": ("cross", "", ""),
    "minimax_music3_rvq_depth_decoder": ("other", "", "music"),
    "pixart_transformer_2d": ("cross", "", ""),
    "prior_transformer": ("other", "", "CLIP prior"),
    "sana_transformer": ("cross", "", ""),
    "stable_audio_transformer": ("other", "", "audio"),
    "t5_film_transformer": ("other", "", "spectrogram decoder"),
    "transformer_2d": ("cross", "", ""),
    "transformer_2d_dreamlite": ("cross", "", ""),
    "transformer_allegro": ("cross", "", ""),
    "transformer_anyflow": ("cross", "", "Wan-style video"),
    "transformer_anyflow_far": ("cross", "", "Wan-style video (attn2)"),
    "transformer_bria": ("joint", "start", "Flux-style; no mask"),
    "transformer_bria_fibo": ("joint", "start", "Flux-style; the pipeline's boolean key mask captured"),
    "transformer_bria_fibo2": ("cross", "", "cross_attn to text; gist tokens"),
    "transformer_chroma": ("joint", "start", "Flux-style; boolean masks and ChromaPipeline's float 0/1 mask (SDPA adds it as a bias) captured exactly"),
    "transformer_chronoedit": ("cross", "", "Wan-style video"),
    "transformer_cogview3plus": ("joint", "start", "processor in attention_processor.py (SDPA)"),
    "transformer_cogview4": ("joint", "start", "a text mask (its processor makes it a float 0/1 bias, as Chroma's) is captured exactly; the pipeline passes none"),
    "transformer_cosmos": ("cross", "", ""),
    "transformer_cosmos3": ("joint", "other stream", "mixture of transformers: generation queries, understanding keys"),
    "transformer_easyanimate": ("joint", "start", "grid [frames, h, w]"),
    "transformer_ernie_image": ("joint", "end", "key mask from text_lens"),
    "transformer_flux": ("joint", "start", "Flux.1, Kontext"),
    "transformer_flux2": ("joint", "start", "Flux.2 (reference images after the generated image)"),
    "transformer_flux3": ("joint", "start", "single blocks only (per-mode blocks see one token mode); reference images after the generated image"),
    "transformer_glm_image": ("joint", "start", "CogView4-style; KV-cache reads (image-to-image) refused, writes not steps; a text mask (float 0/1 bias) captured exactly, as CogView4's"),
    "transformer_helios": ("cross", "", ""),
    "transformer_hidream_image": ("joint", "end", "SDPA; several text streams per block"),
    "transformer_hunyuan_video": ("joint", "end", "key mask from encoder_attention_mask; grid [frames, h, w]"),
    "transformer_hunyuan_video15": ("joint", "end", "outer-product token mask; text block [image condition, ByT5, MLLM]"),
    "transformer_hunyuan_video_framepack": ("joint", "end", "HunyuanVideo processor; history tokens before the generated frames: reordered, grid of the generated frames"),
    "transformer_hunyuanimage": ("joint", "end", "key mask from encoder_attention_mask"),
    "transformer_ideogram4": ("joint", "mixed", "one sequence, segment mask"),
    "transformer_joyimage": ("joint", "end", "edit: image tokens [generated, references]"),
    "transformer_joyimage_edit_plus": ("joint", "end", "padded patches [generated, references]; key mask from encoder_hidden_states_mask"),
    "transformer_kandinsky": ("cross", "", ""),
    "transformer_kandinsky6": ("cross", "", ""),
    "transformer_kandinsky6_sr": ("no text", "", "super-resolution"),
    "transformer_krea2": ("joint", "start", "single stream; key mask from encoder_attention_mask"),
    "transformer_longcat_audio_dit": ("other", "", "audio"),
    "transformer_longcat_image": ("joint", "start", "Flux-style"),
    "transformer_ltx": ("cross", "", ""),
    "transformer_ltx2": ("cross", "", "audio-video"),
    "transformer_lumina2": ("joint", "start", "per-sample text length ([text, image, padding]): reordered to [text, padding, image]; SDPA"),
    "transformer_minimax_h3": ("joint", "mixed", "text, video and audio tokens at scattered positions"),
    "transformer_minimax_music3": ("other", "", "music"),
    "transformer_mochi": ("joint", "end", "processor in attention_processor.py; one SDPA call per sample (its valid text): batch of one only"),
    "transformer_motif_video": ("joint", "end", "key mask; decoder blocks (no text) refused; its text cross-attention not captured"),
    "transformer_nucleusmoe_image": ("joint", "end", "image queries only (text in the keys): i2t only, no t2i"),
    "transformer_omnigen": ("joint", "?", "LLM-style sequence"),
    "transformer_ovis_image": ("joint", "start", "Flux-style"),
    "transformer_prx": ("joint", "start", "image queries only (text in the keys): i2t only, no t2i"),
    "transformer_qwenimage": ("joint", "start", "encoder_hidden_states_mask honoured (key mask)"),
    "transformer_qwenimage21": ("joint", "?", "KV cache of condition tokens; order not read"),
    "transformer_rfd4_proteina": ("other", "", "proteins"),
    "transformer_sana_video": ("cross", "", ""),
    "transformer_sana_wm": ("cross", "", ""),
    "transformer_sana_wm_refiner": ("cross", "", ""),
    "transformer_sd3": ("joint", "end", "SD3 / SD3.5 (JointAttnProcessor2_0, SDPA)"),
    "transformer_skyreels_v2": ("cross", "", "Wan-style video"),
    "transformer_stable_audio3": ("other", "", "audio"),
    "transformer_temporal": ("no text", "", "temporal layers"),
    "transformer_wan": ("cross", "", ""),
    "transformer_wan_animate": ("cross", "", ""),
    "transformer_wan_animate_2": ("cross", "", ""),
    "transformer_wan_vace": ("cross", "", "Wan processor"),
    "transformer_z_image": ("joint", "end", "basic mode [image, caption] per sample (key mask); omni mode refused ([caption, images, SigLIP])"),
}


def _status(models: List[str], kind: str, text: str) -> str:
    """``supported`` (an adapter in ``ADAPTERS``), ``not yet: ...`` or
    ``no: ...`` (no joint text-image attention to capture)."""
    from seg4diff_fast.capture import ADAPTERS

    supported = {c.__name__ for a in ADAPTERS for c in a.transformer_classes()}
    if any(m in supported for m in models):
        return "supported"
    if kind == "cross":
        return "no: cross-attention (not joint attention)"
    if kind in ("no text", "other"):
        return "no: no text-image attention"
    if kind == "?" or text in ("?", "mixed", "other stream"):
        return "not yet: token layout not a text block at one end"
    return "not yet: no adapter"


def markdown() -> str:
    """The README table, one row per module of the installed diffusers."""
    import diffusers

    rows = [
        f"Generated by `python tools/survey_transformers.py --markdown` from diffusers {diffusers.__version__} "
        "(checked by `tests/test_capture_survey.py`).",
        "",
        "| module | model classes | kind | text | attention call | mask argument | capture | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in survey().items():
        kind, text, note = KNOWN.get(name, ("?", "", "new module: not in KNOWN"))
        call = "dispatch" if s["dispatch"] else "SDPA" if s["sdpa"] else "elsewhere"
        mask = "yes" if s["mask"] else "no" if call != "elsewhere" else ""
        models = ", ".join(s["models"]) or "(blocks only)"
        rows.append(f"| {name} | {models} | {kind} | {text} | {call} | {mask} | {_status(s['models'], kind, text)} | {note} |")
    return "\n".join(rows) + "\n"


def families_markdown() -> str:
    """The capture README's table of the supported families, one row per record."""
    from seg4diff_fast.capture.families import FAMILIES, MODULES

    rows = ["| family | transformer | layers | text | grid | file |", "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        classes = ", ".join(f"`{p.rpartition('.')[2]}`" for p in f.transformers)
        layers = ", ".join(f"`{kind.blocks}.{{i}}`" for kind in f.blocks)
        text = f.text_at + (f" ({f.text})" if f.text else "")
        rows.append(f"| {f.title} | {classes} | {layers} | {text} | {f.grid_text} | `families/{MODULES[f.family]}.py` |")
    return "\n".join(rows) + "\n"


def kinds_markdown() -> str:
    """docs/02-capture.md's table of the supported families by kind."""
    from seg4diff_fast.capture.families import FAMILIES

    def names(chosen):
        return ", ".join(f.title + (" (i2t only)" if f.image_queries else "") for f in chosen)

    images = [f for f in FAMILIES if not f.video]
    return "\n".join([
        "| kind | families |", "|---|---|",
        f"| image, text at the end | {names(f for f in images if f.text_at == 'end')} |",
        f"| image, text at the start | {names(f for f in images if f.text_at == 'start')} |",
        f"| video (grid `(frames, h, w)`) | {names(f for f in FAMILIES if f.video)} |",
    ]) + "\n"


def models_markdown() -> str:
    """The front README's "Supported models" table: a row per record that segmentation runs (its ``segment``: whose
    defaults, the expert layer, the noise level), one row for the records that capture only."""
    from seg4diff_fast.capture.families import FAMILIES
    from seg4diff_fast.segmentation.protocol import MIDDLE, PROTOCOLS

    rows = ["| models | capture | segment (default layer, noise level) |", "|---|---|---|"]
    for f in FAMILIES:
        seg = f.segment
        if seg is None:
            continue
        p = PROTOCOLS[f.family]
        layer = "the middle joint block" if seg.layer == MIDDLE else f"`{f.blocks[0].blocks}.{seg.layer}`"
        whose = "the paper's" if seg.paper else "ours"
        models = (seg.models or f.title) + (" (video)" if f.video else "")
        rows.append(f"| {models} | yes | {whose}: {layer}, `timesteps[{p.timestep_index}]` of "
                    f"{p.num_inference_steps} steps |")
    rows.append(f"| {', '.join(f.title for f in FAMILIES if f.segment is None)} | yes | no |")
    return "\n".join(rows) + "\n"


def segmentation_markdown() -> str:
    """docs/03-segmentation.md's family table: a row per record that segmentation runs (its ``segment``): the protocol
    keys, pipelines, the text columns read, the default expert layer and noise level, whose defaults."""
    from seg4diff_fast.capture.families import FAMILIES
    from seg4diff_fast.segmentation.protocol import MIDDLE, PROTOCOLS

    rows = ["| `--family` | pipelines | columns read | default expert layer, noise | defaults are |",
            "|---|---|---|---|---|"]
    for f in FAMILIES:
        seg = f.segment
        if seg is None:
            continue
        p = PROTOCOLS[f.family]
        keys = ", ".join(f"`{k}`" for k in (f.family, *seg.variants)) + (" (video)" if f.video else "")
        layer = "the middle joint block" if seg.layer == MIDDLE else f"`{f.blocks[0].blocks}.{seg.layer}`"
        noise = ("DDPM `add_noise` at " if seg.noise == "ddpm" else "") + (
            f"`timesteps[{p.timestep_index}]` of {p.num_inference_steps}")
        extra = [f"shift for {p.shift_seq_len} tokens" if p.shift_seq_len else "",
                 f"guidance {p.guidance}" if "guidance" in seg.settings else "",
                 f"{p.size} px {p.resize}" if "size" in seg.settings else ""]
        noise = ", ".join([noise] + [e for e in extra if e])
        pipelines = ", ".join(f"`{name}`" for name in seg.pipelines)
        whose = "the paper's" if seg.paper else "ours"
        rows.append(f"| {keys} | {pipelines} | {seg.columns} | {layer}; {noise} | {whose} |")
    return "\n".join(rows) + "\n"


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(_ROOT, "seg4diff_fast", "capture", "README.md")
START, END = "<!-- survey:start -->\n", "<!-- survey:end -->"
#: (file, start marker, end marker, generator) of every generated table
TABLES = [
    (README, START, END, markdown),
    (README, "<!-- families:start -->\n", "<!-- families:end -->", families_markdown),
    (os.path.join(_ROOT, "docs", "02-capture.md"), "<!-- families:start -->\n", "<!-- families:end -->",
     kinds_markdown),
    (os.path.join(_ROOT, "README.md"), "<!-- models:start -->\n", "<!-- models:end -->", models_markdown),
    (os.path.join(_ROOT, "docs", "03-segmentation.md"), "<!-- segment:start -->\n", "<!-- segment:end -->",
     segmentation_markdown),
]


def committed(path: str, start: str, end: str) -> str:
    """The table between the markers ``start`` and ``end`` of ``path`` as committed."""
    text = open(path, encoding="utf-8").read()
    return text[text.index(start) + len(start):text.index(end)]


def update_readme() -> None:
    """Rewrite every generated table (:data:`TABLES`) between its markers."""
    for path, start, end, make in TABLES:
        text = open(path, encoding="utf-8").read()
        a, b = text.index(start) + len(start), text.index(end)
        new = text[:a] + make() + text[b:]  # before opening for writing: an error leaves the file as it was
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--update-readme", action="store_true",
                        help=f"rewrite the tables in {README}, docs/02-capture.md, docs/03-segmentation.md and "
                             "README.md")
    args = parser.parse_args()
    if args.update_readme:
        update_readme()
    elif args.markdown:
        print(markdown(), end="")
    else:
        for name, s in survey().items():
            print(name, s)
