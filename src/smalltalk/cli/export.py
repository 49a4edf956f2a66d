"""`smalltalk export MODEL_DIR --out HF_DIR`: write a Hugging Face `transformers` (GPT-NeoX) directory.

    smalltalk export runs/x/dense/model --out hf/dense          # one model
    smalltalk export runs/x --out hf/x                          # a run or bundle: every expert, router and the
                                                                # dense model, plus bundle_hf.json (how to route)
"""

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
    p.add_argument("model_dir", type=Path, help="model directory (model.safetensors + config.json + tokenizer.json), "
                                                "or a mixture bundle / run directory (exports all its models)")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to ship (default: the one in MODEL_DIR)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the export with transformers and comparing logits")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.hf_export import export_hf

    from ..run.locate import is_model_dir, locate

    if not args.no_check:
        try:
            import transformers  # noqa: F401
        except ModuleNotFoundError:
            raise SmallTalkError("the export check loads the result with transformers, which is not installed: "
                                 "pip install 'smalltalk[hf]' (or pass --no-check)") from None
    located = locate(args.model_dir, what="export")
    if located.bundle is not None:
        return export_mixture(args, located)
    path = located.model
    if not is_model_dir(path) and path.is_dir():
        raise SmallTalkError(f"{path}: neither a model directory (no config.json) nor a mixture bundle or run "
                             "directory (no bundle.json); give e.g. RUN/dense/model, RUN/bundle or RUN")
    out = export_hf(path, args.tokenizer, args.out)
    print(f"exported {path} -> {out}")
    if not args.no_check:
        check(path, out)
    return 0


def check(model_dir: Path, out: Path) -> None:
    from ..data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from ..model.generate import encode
    from ..model.hf_export import compare_logits
    from ..model.io import load_model_dir

    model, _ = load_model_dir(model_dir)
    tokenizer = load_tokenizer(out / TOKENIZER_FILE)
    diff = compare_logits(model, out, encode(tokenizer, CHECK_TEXT))
    if diff > CHECK_TOLERANCE:
        raise SmallTalkError(f"{out}: transformers' logits differ from ours by {diff:.2e} (> {CHECK_TOLERANCE}); "
                             "the export is wrong, please report it")
    print(f"checked: transformers loads {out} and its logits match ours (max abs diff {diff:.1e})")


def export_mixture(args, located) -> int:
    from ..mixture.bundle import read_bundle
    from ..mixture.hf_bundle import export_bundle_hf

    bundle, dense = located.bundle, located.dense
    if args.tokenizer is not None:
        raise SmallTalkError("--tokenizer applies to one model; a bundle's models all use the bundle's tokenizer")
    manifest = export_bundle_hf(bundle, args.out, dense=dense)
    names = manifest["experts"] + manifest["routers"] + ([manifest["dense"]] if manifest["dense"] else [])
    print(f"exported {bundle}{' and ' + str(dense) if dense else ''} -> {args.out}: {', '.join(names)}; "
          f"routing rule in {args.out / 'bundle_hf.json'}")
    if not args.no_check:
        info = read_bundle(bundle)
        sources = [e.dir for e in info.experts] + [r.dir for r in info.routers] + ([dense] if dense else [])
        for src, name in zip(sources, names):
            check(src, args.out / name)
    return 0
