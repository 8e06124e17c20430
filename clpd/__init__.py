"""clpd: Curriculum Learning-Guided Progressive Distillation of reasoning into small language models."""

__version__ = "0.1.0"
