from ..config import register_method
from .config import QuantumPEFTConfig
from .method import QuantumPEFTMethod, param_count
from .orthogonal import CayleyColumns, DirectSum, MixedRadix, PauliQubits, build_circuit, pauli_param_count

register_method("quantum_peft", QuantumPEFTConfig, QuantumPEFTMethod)

__all__ = [
    "CayleyColumns",
    "DirectSum",
    "MixedRadix",
    "PauliQubits",
    "QuantumPEFTConfig",
    "QuantumPEFTMethod",
    "build_circuit",
    "param_count",
    "pauli_param_count",
]
