"""Export a model to a Hugging Face `transformers` GPT-NeoX directory (no custom code).

    export_hf("runs/dense/model", None, "hf/dense")      # tokenizer.json taken from the model dir
    AutoModelForCausalLM.from_pretrained("hf/dense")     # GPTNeoXForCausalLM
    AutoTokenizer.from_pretrained("hf/dense")

Our `Transformer` already uses GPT-NeoX's module names and layouts (fused QKV viewed per head as
q | k | v, rotate-half RoPE, sequential pre-LN residual, exact-GELU 2-matrix MLP), so export is a
renaming: every weight gets the `gpt_neox.` prefix and the output projection stays `embed_out`
(transformers 4.x's name; 5.x renames it to `lm_head` on load). A tied output projection is not
stored (`tie_word_embeddings`). The config carries the rotary settings under both spellings:
`rope_parameters` (transformers >= 5) and `rotary_pct` / `rotary_emb_base` (4.x).

Output directory (written into a temporary sibling and renamed into place)::

    config.json               GPTNeoXConfig
    generation_config.json    bos / eos / pad ids
    model.safetensors         weights (the model's dtype)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (data.tokenizer.save_pretrained_tokenizer)
    smalltalk_export.json     what was exported, from where
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import SmallTalkError
from ..io import atomic_dir, atomic_write_json, current_umask
from .config import ModelConfig
from ..data.tokenizer import TOKENIZER_FILE
from .io import load_model_dir, unwrap_model, weights_state_dict
from .transformer import Transformer

def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for `GPTNeoXForCausalLM` equivalent to `cfg`."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_size,
        "hidden_act": "gelu",  # exact (erf) GELU, as F.gelu; not "gelu_new" / "gelu_fast"
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "use_parallel_residual": False,
        "attention_bias": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0,
        "rotary_emb_base": cfg.rotary_base,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weight names -> GPTNeoXForCausalLM's (`gpt_neox.` prefix; `embed_out` kept, dropped when tied)."""
    return {(name if name == "embed_out.weight" else f"gpt_neox.{name}"): tensor
            for name, tensor in weights_state_dict(model).items()}


def export_hf(model_dir_or_model: str | os.PathLike | torch.nn.Module, tokenizer_file: str | os.PathLike | None,
              out_dir: str | os.PathLike) -> Path:
    """Write a `transformers` directory for a model directory (or an in-memory model) and its tokenizer.

    `tokenizer_file` defaults to the model directory's tokenizer.json. An existing `out_dir` is
    replaced atomically. Returns `out_dir`.
    """
    from ..data.tokenizer import load_tokenizer, save_pretrained_tokenizer

    source: dict[str, Any]
    if isinstance(model_dir_or_model, torch.nn.Module):
        model, source = unwrap_model(model_dir_or_model), {"model": "in-memory"}
    else:
        model_dir = Path(model_dir_or_model)
        model, _ = load_model_dir(model_dir)
        source = {"model": str(model_dir)}
        tokenizer_file = tokenizer_file if tokenizer_file is not None else model_dir / TOKENIZER_FILE
    if tokenizer_file is None:
        raise SmallTalkError("export: no tokenizer given; pass the tokenizer.json the model was trained with")
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise SmallTalkError(f"{tokenizer_file}: tokenizer file not found; an exported model needs its tokenizer")
    cfg = model.config
    tokenizer = load_tokenizer(tokenizer_file)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SmallTalkError(f"{tokenizer_file}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size}; was the model trained with another tokenizer?")
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    dtype = next(model.parameters()).dtype

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        from safetensors.torch import save_file

        # transformers refuses safetensors files without format metadata.
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~current_umask())
        atomic_write_json(tmp / "config.json", hf_config(cfg, dtype=dtype, **_short(ids)))
        atomic_write_json(tmp / "generation_config.json", ids)
        save_pretrained_tokenizer(tokenizer_file, tmp, model_max_length=cfg.max_seq_len)
        atomic_write_json(tmp / "smalltalk_export.json", {
            "format": "smalltalk-hf-export", "version": 1, **source, "model_config": cfg.to_dict(),
            "tokenizer_sha256": tokenizer.sha256, "special_tokens": ids})
    return out_dir


@torch.inference_mode()
def compare_logits(model: Transformer, hf_dir: str | os.PathLike, token_ids: list[int]) -> float:
    """Max |logit difference| between `model` and the exported `hf_dir` on `token_ids` (both fp32, CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SmallTalkError("checking an export needs transformers: pip install 'smalltalk[hf]'") from None
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in our CLI output
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model = unwrap_model(model)
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # .float() / .cpu() would change the caller's model
    idx = torch.tensor([token_ids[:model.config.max_seq_len]], dtype=torch.long)
    ours = model(idx)
    theirs = hf_model(idx).logits
    return float((ours - theirs).abs().max())


def _short(ids: dict[str, int | None]) -> dict[str, int | None]:
    return {"bos_id": ids["bos_token_id"], "eos_id": ids["eos_token_id"], "pad_id": ids["pad_token_id"]}
