"""smalltalk: asynchronous mixtures of language models (SmallTalk LM, ICLR 2025).

    import smalltalk
    smalltalk.run("tiny", "runs/quickstart")
    mixture = smalltalk.Mixture.load("runs/quickstart")
    mixture.generate("def fibonacci(n):", max_new_tokens=32).result.text

The names below are the public API (docs/python-api.md). Importing the package stays cheap: torch and the
rest load on first use of a name.
"""

from . import run as _run_package  # noqa: F401  (the subpackage is bound first, so `smalltalk.run` stays the function below)

from .version import __version__  # noqa: E402

_API = {
    "Mixture": "api", "grow": "api", "shrink": "api",
    "RunConfig": "run.config", "DenseSettings": "run.config", "load_run_config": "run.config",
    "ModelConfig": "model.config", "TrainConfig": "train.config", "RouterEMConfig": "routing.config",
    "PrepareConfig": "data.prepare_config", "EvalConfig": "mixture.evaluate", "GrowConfig": "mixture.grow",
    "SmallTalkError": "errors", "recommend": "plan.planner",
}
__all__ = ["run", *_API, "__version__"]


def run(config, out, **kwargs):
    """Run (or resume) the whole pipeline; see `smalltalk.api.run`."""
    from .api import run as _run

    return _run(config, out, **kwargs)


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smalltalk' has no attribute {name!r}")
