"""`smalltalk export MODEL_DIR --out HF_DIR`: write a Hugging Face `transformers` (GPT-NeoX) directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import SmallTalkError

# Checked after export: the exported model must give our logits on this text.
CHECK_TEXT = ("The committee met on Tuesday to review the budget. After a long discussion, "
              "the members agreed to fund the new library and to repair the old bridge.")
CHECK_TOLERANCE = 1e-4


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model directory to Hugging Face transformers format",
                              description="Write a directory that transformers.AutoModelForCausalLM and "
                                          "AutoTokenizer load without custom code (GPTNeoXForCausalLM), then "
                                          "check that it reproduces this model's logits.")
    p.add_argument("model_dir", type=Path, help="model directory (model.safetensors + config.json + tokenizer.json)")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to ship (default: the one in MODEL_DIR)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the export with transformers and comparing logits")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.generate import encode
    from ..model.hf_export import compare_logits, export_hf
    from ..model.io import load_model_dir

    out = export_hf(args.model_dir, args.tokenizer, args.out)
    print(f"exported {args.model_dir} -> {out}")
    if args.no_check:
        return 0
    from ..data.tokenizer import load_tokenizer

    model, _ = load_model_dir(args.model_dir)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    diff = compare_logits(model, out, encode(tokenizer, CHECK_TEXT))
    if diff > CHECK_TOLERANCE:
        raise SmallTalkError(f"{out}: transformers' logits differ from ours by {diff:.2e} (> {CHECK_TOLERANCE}); "
                             "the export is wrong, please report it")
    print(f"checked: transformers loads {out} and its logits match ours (max abs diff {diff:.1e})")
    return 0
