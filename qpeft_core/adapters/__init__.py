"""Adapter methods and the toolkit they share (see model.py for the method contract)."""

from .config import METHODS, AdapterConfig, config_from_dict, method_runs_circuits, register_method
from .layers import AdaptedLinear, TargetInfo
from .model import AdapterMethod, QPEFTModel, get_qpeft_model
from .qpa import QPAConfig, QPAMethod

try:  # Quantum-PEFT registers itself on import; it is built in its own package
    from .quantum_peft import QuantumPEFTConfig
except ImportError as e:  # only while that package is not there yet; an error inside it still surfaces
    if e.name != f"{__name__}.quantum_peft":
        raise
    QuantumPEFTConfig = None

__all__ = [
    "METHODS",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterMethod",
    "QPAConfig",
    "QPAMethod",
    "QPEFTModel",
    "QuantumPEFTConfig",
    "TargetInfo",
    "config_from_dict",
    "get_qpeft_model",
    "method_runs_circuits",
    "register_method",
]
