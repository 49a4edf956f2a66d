"""Downstream evaluation through lm-evaluation-harness (paper §3.3, App. B).

- `lm_eval_model`: the ``smalltalk`` lm-eval model (mixture bundle routed per request, or one model)
- `lm_eval_cli`: ``python -m smalltalk.evaluation.lm_eval_cli ...`` = lm-eval's CLI with it registered
- `tasks/`: offline task YAMLs (BLiMP 67 paradigms, HellaSwag, GSM8K) over `task_data` loaders
- `scoring`: batched windowed log-likelihood; `backend`: bundle or model directory behind one surface
- `downstream`: mixture vs dense side-by-side table (``smalltalk eval-downstream``)

Importing this package does not import lm-eval; `lm_eval_model` does.
"""
