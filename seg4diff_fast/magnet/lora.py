"""LoRA adapters for MAGNET: the paper's layout, saving in diffusers' format, loading ours and the paper's files.

The paper's code (cvlab-kaist/Seg4Diff at bb500ca, ``seg4diff/modeling/backbone/sd3_backbone.py`` l. 57-110):
``LoraConfig(r=LORA_RANK (16), lora_alpha=r, init_lora_weights="gaussian", target_modules=["attn.to_k",
"attn.to_q", "attn.to_v", "attn.to_out.0"])`` added with ``transformer.add_adapter`` on every block
(``LORA_LAYERS`` unset), so the LoRA scale alpha / r is 1. The text projections (``add_q_proj`` ...) are not adapted.

Its released adapters (``chyun/seg4diff-coco-lora``, ``chyun/seg4diff-sa1b-lora``: ``lora_weights.pth``) are
detectron2 checkpoints loaded as ``MODEL.WEIGHTS``: a torch pickle, ``{"model": state_dict}`` or the state dict
itself, whose keys are the trainer's module paths with peft's adapter name, e.g.
``backbone.transformer.transformer_blocks.3.attn.to_q.lora_A.default.weight``; such a file may also hold non-LoRA
entries (the training-only ``attn_mlp.*`` head, buffers). The code's own ``LORA_WEIGHTS`` loader strips
``backbone.transformer.`` and ``.default.`` and keeps ``lora`` keys (l. 95-110): :func:`load_lora` does the same.
(This layout is read from the code; the released files themselves could not be downloaded here.)

Our files are diffusers' format: ``pytorch_lora_weights.safetensors`` written by
``StableDiffusion3Pipeline.save_lora_weights`` from peft's ``get_peft_model_state_dict`` (keys
``transformer.<module>.lora_A.weight`` / ``lora_B``), with the adapter's LoraConfig in the safetensors
metadata, so ``pipe.load_lora_weights(path)`` restores rank and alpha.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import torch

__all__ = ["PAPER_TARGETS", "lora_config", "add_lora", "lora_state_dict", "save_lora", "read_lora", "load_lora",
           "LORA_WEIGHT_NAME"]

PAPER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_config(rank: int = 16, alpha: Optional[float] = None, targets: Sequence[str] = PAPER_TARGETS,
                blocks: Union[str, Iterable[int]] = "all", init: Union[str, bool] = "gaussian"):
    """peft ``LoraConfig`` of the paper: rank 16, ``alpha = rank`` (``None``), the image-stream attention
    projections of every block, gaussian init of A (B = 0). ``blocks``: ``"all"`` or block indices of
    ``transformer_blocks`` (then each target becomes ``transformer_blocks.<i>.<target>``)."""
    from peft import LoraConfig

    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError("targets is empty: name at least one module, e.g. 'attn.to_q'")
    if blocks != "all":
        if isinstance(blocks, str):
            raise ValueError(f"blocks must be 'all' or a list of block indices, got {blocks!r}")
        idx = [int(b) for b in blocks]
        if not idx or min(idx) < 0:
            raise ValueError(f"blocks must be 'all' or non-negative block indices, got {list(blocks)}")
        targets = [f"transformer_blocks.{b}.{t}" for b in idx for t in targets]
    return LoraConfig(r=int(rank), lora_alpha=float(rank if alpha is None else alpha), init_lora_weights=init,
                      target_modules=targets)


def add_lora(transformer, config=None, adapter_name: str = "default"):
    """Add the adapter (``config`` default: :func:`lora_config`) and freeze every non-LoRA parameter, as the
    paper's trainer. Returns the list of trainable (LoRA) parameters."""
    config = lora_config() if config is None else config
    transformer.add_adapter(config, adapter_name=adapter_name)
    params = []
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"no module of the transformer matched the LoRA targets {sorted(config.target_modules)}")
    return params


def lora_state_dict(transformer, adapter_name: str = "default") -> dict:
    """peft's state dict of the adapter: ``<module>.lora_A.weight`` -> tensor (no adapter name, no prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def _split(path: str):
    if path.endswith(".safetensors"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, LORA_WEIGHT_NAME


def save_lora(transformer, path: str, adapter_name: str = "default") -> str:
    """Write the adapter in diffusers' format. ``path``: a ``.safetensors`` file, or a folder (then
    ``<path>/pytorch_lora_weights.safetensors``). Returns the file written."""
    from diffusers import StableDiffusion3Pipeline

    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"the transformer has no LoRA adapter {adapter_name!r} to save (see add_lora)")
    folder, name = _split(path)
    os.makedirs(folder, exist_ok=True)
    config = transformer.peft_config[adapter_name].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=lora_state_dict(transformer, adapter_name), weight_name=name,
        transformer_lora_adapter_metadata=config)
    return os.path.join(folder, name)


def _convert_paper(sd: dict, path: str) -> dict:
    """The paper's checkpoint keys -> ``<module>.lora_X.weight`` (see the module docstring)."""
    out = {}
    for k, v in sd.items():
        if "lora_" not in k or not isinstance(v, torch.Tensor):
            continue  # attn_mlp head, buffers, base weights
        for prefix in ("module.", "backbone.transformer.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace(".default.", ".")] = v
    if not out:
        raise ValueError(f"{path}: no LoRA weights (no key with 'lora_') in this checkpoint")
    return out


def read_lora(path: str) -> tuple:
    """Read a LoRA file -> ``(state_dict, metadata)``: keys ``<module>.lora_A.weight`` (no prefix), metadata the
    LoraConfig dict stored by :func:`save_lora` or ``None``. Reads our safetensors (a file or a folder holding
    ``pytorch_lora_weights.safetensors``) and the paper's ``.pth`` checkpoints."""
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path} not found")
    if path.endswith(".safetensors"):
        import json

        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        raw = meta.get("lora_adapter_metadata")  # diffusers: JSON of {"transformer.<field>": value}
        config = ({k[len("transformer."):]: v for k, v in json.loads(raw).items() if k.startswith("transformer.")}
                  if raw else None)
        out = {}
        for k, v in sd.items():
            if not k.startswith("transformer."):
                raise ValueError(f"{path}: key {k!r} is not a transformer LoRA weight (expected 'transformer.' keys)")
            out[k[len("transformer."):]] = v
        if not out or not any("lora_" in k for k in out):
            raise ValueError(f"{path}: no LoRA weights in this file")
        return out, config
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same here
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (or a detectron2 checkpoint with 'model'), got {type(obj)}")
    return _convert_paper(obj, path), None


def load_lora(target, path: str, adapter_name: str = "default"):
    """Load a LoRA file (ours or the paper's) into a pipeline or a transformer.

    - A pipeline (anything with ``load_lora_weights``): the weights go through diffusers' own loader, as a
      new adapter ``adapter_name``.
    - A transformer without that adapter: a new adapter with the file's rank and alpha.
    - A transformer that has the adapter already (e.g. made by :func:`add_lora`, to resume training): the values
      are copied into it; every key must match and shapes must agree.
    Returns ``target``. Errors name ``path``.
    """
    sd, config = read_lora(path)
    transformer = getattr(target, "transformer", target)
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        from peft.utils import set_peft_model_state_dict

        own = lora_state_dict(transformer, adapter_name)
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path}: LoRA keys do not match adapter {adapter_name!r}: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                             f"{'...' if len(unexpected) > 3 else ''}")
        bad = [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            raise ValueError(f"{path}: shape of {bad[0]} is {tuple(sd[bad[0]].shape)}, adapter has "
                             f"{tuple(own[bad[0]].shape)}")
        set_peft_model_state_dict(transformer, sd, adapter_name=adapter_name)
        return target
    # New adapter: diffusers' own loaders. Our safetensors go by path (they read rank and alpha from the stored
    # LoraConfig); the paper's weights as a state dict (diffusers takes the rank from the shapes and alpha = rank,
    # the paper's choice).
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if path.endswith(".safetensors"):
        source, kwargs = os.path.dirname(os.path.abspath(path)), dict(weight_name=os.path.basename(path))
    else:
        source, kwargs = {f"transformer.{k}": v for k, v in sd.items()}, {}
    if hasattr(target, "load_lora_weights"):
        target.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    else:
        transformer.load_lora_adapter(source, prefix="transformer", adapter_name=adapter_name, **kwargs)
    return target
