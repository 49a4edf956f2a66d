"""A SmallTalk run: the pipeline that trains a mixture and its dense baseline, stage by stage, in one run
directory (`config.py`, `layout.py`, `pipeline.py`, `experts.py`, `dense.py`, `report.py`). Importing it is
cheap (no torch); `smalltalk.run(...)` at the package top is the function that runs one."""
