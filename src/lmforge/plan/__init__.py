"""Planning: memory / FLOPs / GPU-hours estimators (memory.py) and scaling-law fits (scaling.py)."""
