"""Engine: scheduling, KV block management and the step loop. The scheduler and the KV
manager are pure Python (no torch); the model runner is reached through `outputs.py` types."""
