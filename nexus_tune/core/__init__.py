"""The core layer: sequences, KV blocks, the scheduler and its controller, the latency model and the
profile, the simulator, workloads and metrics. Pure Python: no torch at import, and it never imports
the engine or the commands (tests/test_layers.py enforces both)."""
