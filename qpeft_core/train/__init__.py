"""Training: local data, base models, one Accelerate loop for LoRA / QPA / Quantum-PEFT, metrics, checkpoints."""

from .data import Batches, TokenData, cls_examples, lm_blocks, lm_lines, load_data, read_labeled, read_texts
from .loop import TrainConfig, TrainResult, train
from .metrics import accuracy, evaluate, perplexity
from .models import load_model, make_lora_model

__all__ = [
    "Batches",
    "TokenData",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "cls_examples",
    "evaluate",
    "lm_blocks",
    "lm_lines",
    "load_data",
    "load_model",
    "make_lora_model",
    "perplexity",
    "read_labeled",
    "read_texts",
    "train",
]
