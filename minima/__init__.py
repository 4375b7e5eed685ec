"""minima: distil large language models at cluster scale with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
