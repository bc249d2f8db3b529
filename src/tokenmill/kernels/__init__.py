"""Native kernels tokenmill builds itself: `cpu.py` compiles csrc/ on first use."""
