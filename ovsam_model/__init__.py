"""Open-Vocabulary SAM model library (no CLI code here)."""

__version__ = "0.1.0"
