"""Kernel tuning on the user's card: benchmark cases, GPU timing, candidate search and `tune_model`.

Below `llm.py` (which tunes missing entries before loading, `LLM(tune=True)`) and `bench/` (which times the
same cases); the tables it writes are read by `kernels/configs.py`.
"""
