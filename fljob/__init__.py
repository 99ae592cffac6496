"""fljob: one validated job spec for muP LLM pretraining on torchtitan."""

__version__ = "0.1.0"
