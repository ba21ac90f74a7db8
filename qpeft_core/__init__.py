"""qpeft: hybrid quantum-classical parameter-efficient fine-tuning (QPA, Quantum-PEFT)."""

from .adapters import QPAConfig, QPEFTModel, QuantumPEFTConfig, get_qpeft_model

__all__ = ["QPAConfig", "QPEFTModel", "QuantumPEFTConfig", "get_qpeft_model"]
