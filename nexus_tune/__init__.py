"""nexus-tune: split one GPU's SMs between LLM prefill and decode, and pick the split on the fly."""

__version__ = "0.1.0"
