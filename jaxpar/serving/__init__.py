"""Continuous batching: requests join and leave a running batch (scheduler.py decides, runner.py executes on the
decode state, pages.py owns the KV cache pages, loop.py drives both and hands tokens to callers)."""
