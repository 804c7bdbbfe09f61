"""Training: SAM2CLIP distillation (spec §6)."""
