"""ensemble-kd: ensemble and cross-modal knowledge distillation on Ray."""
__version__ = "0.1.0"
