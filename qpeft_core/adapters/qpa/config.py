"""QPA's configuration (DESIGN.md 1a)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...quantum.registry import check_executor_options
from ..config import AdapterConfig

ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "none")
CHOICES = {
    "entangler": ("ladder", "ring"),
    "bit_features": ("index", "pairs", "triples", "random"),
    "gradient": ("auto", "autograd", "parameter_shift", "spsa", "shot_adaptive"),
    "quantum_grad": ("per_backward", "per_step"),
    "mapping": ("default", "reference"),
    "layout": ("target", "rows"),
    "p_mode": ("feature", "scale"),
    "activation": ACTIVATIONS,
}


@dataclass
class QPAConfig(AdapterConfig):
    """Quantum Parameter Adaptation: a QNN + mapping MLP generate the LoRA factors of all targets at once.

    r, lora_alpha: the generated LoRA's rank and scaling (Delta W = B A * lora_alpha / r).
    n_mlp: generated parameters per basis state; B = ceil(m / n_mlp) states, N = ceil(log2 B) qubits.
    qnn_depth, entangler: the QNN's L blocks of [RY on every qubit, CNOT ladder (or ring)].
    mapping_widths, activation: hidden widths of the mapping MLP and the nonlinearity between its layers
        ("none" is the reference's purely linear stack). None: with mapping="reference" the reference's seven
        layers (REFERENCE_WIDTHS), else one hidden layer as wide as param_budget allows. One wide layer,
        because the generated B x n_mlp block has rank at most (last hidden width + 1): the reference's
        narrow last layer (32) caps it at 33 however many states there are (benchmarks/RESULTS.md,
        qpa_wikitext_tune).
    param_budget: for mapping_widths=None (not "reference"): all trainable numbers (angles, MLP, gates) at
        most this fraction of the generated LoRA's m; the paper's QPA uses about half.
    bit_features: "index" feeds the N bits of each state's index as +-1; "pairs" adds the products of every
        two of them (N(N-1)/2 more fixed inputs): the hidden layer then sees N + N(N-1)/2 + 1 inputs instead of
        N + 1, so its B x w activations, and with them the generated block, are of higher effective rank;
        "triples" adds the products of every three too;
        "random" re-draws the bits every call, as the reference code does.
    p_mode: how p~ enters. "feature" (the reference's): p~_i is one MLP input beside state i's bits.
        "scale": the MLP sees the bits alone and its output row for state i is multiplied by (1 + p~_i), so
        the QNN sets each state's share of the update directly instead of being one input the MLP may ignore.
        Measured on SST-2 (benchmarks/RESULTS.md, qpa_quantum_scale): no better than "feature", and the QNN
        frozen or replaced by a constant costs nothing there either.
    gamma, beta, alpha: post-processing p~ = (beta tanh(gamma 2^(N-1) p))^alpha - mean.
    executor, executor_options: where circuits run, a spec for qpeft_core.quantum.registry.make_backend, and
        its options; e.g. {"readout_mitigation": "mthree"} for aer-noisy:, fake-ibm: and ibm: executors.
    gradient, shots: the gradient strategy ("auto": autograd when exact, else parameter-shift); None = exact.
        "shot_adaptive" (parameter shift with shots per angle from the estimated noise, up to `shots`) and
        "spsa" (with `samples` averaged and a decaying perturbation) are the shot-frugal ones.
    gradient_options: the strategy's own settings (qpeft_core.quantum.gradients), e.g. {"samples": 4,
        "decay": 0.101} for spsa, {"min_shots": 32, "snr": 4.0} for shot_adaptive.
    quantum_update_every: k > 1 updates the angles every k optimizer steps only, from dL/dp averaged over
        those k steps; the measured p is reused in between (k times fewer circuit calls; the mapping MLP
        still trains every step). A resumed run restarts the count at its checkpoint.
    warm_start_steps: the first steps run the QNN on the exact simulator (no shots), then the configured
        executor takes over from the angles reached.
    quantum_grad: "per_backward" pushes dL/dtheta at every backward (plain loops work); "per_step" once per
        optimizer step from the accumulated dL/dp, in the `before_optimizer_step()` hook.
    mapping: "default" adds one learnable gate per target on B, started at 0, so Delta W = 0 at init;
        "reference" has exactly the reference's parameters (N L angles + MLP) and starts near zero instead
        by scaling the MLP's last layer at init by 1e-3.
    layout: how the m generated numbers become factors. "target" (the reference's): target after target,
        A (r x d_in) then B (d_out x r), row-major. "rows": the factor rows of all targets, A's rows and
        B's columns, longest first; with n_mlp a multiple of the row length (576 for SmolLM2's q/v A rows),
        every basis state yields whole rows, so output unit j of the MLP is the same input (or output)
        feature in every row it writes, not an unrelated entry that happens to share its offset.
    """

    method: ClassVar[str] = "qpa"
    r: int = 4
    lora_alpha: float = 8.0
    n_mlp: int = 2048
    qnn_depth: int = 8
    entangler: str = "ladder"
    mapping_widths: list[int] | None = None
    param_budget: float = 0.5
    activation: str = "gelu"
    bit_features: str = "index"
    gamma: float = 0.1
    beta: float = 0.6
    alpha: float = 0.15
    executor: str = "exact"
    executor_options: dict = field(default_factory=dict)
    gradient: str = "auto"
    gradient_options: dict = field(default_factory=dict)
    shots: int | None = None
    quantum_grad: str = "per_backward"
    seed: int = 0
    mapping: str = "default"
    layout: str = "target"
    quantum_update_every: int = 1
    warm_start_steps: int = 0
    p_mode: str = "feature"

    def __post_init__(self):
        super().__post_init__()
        if self.mapping_widths is not None:
            self.mapping_widths = list(self.mapping_widths)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"QPAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (
            isinstance(self.warm_start_steps, bool)
            or not isinstance(self.warm_start_steps, int)
            or (self.warm_start_steps < 0)
        ):
            raise ValueError(f"QPAConfig.warm_start_steps must be an int >= 0, got {self.warm_start_steps!r}")
        from ...quantum.gradients import STRATEGIES, build_strategy

        if self.gradient in STRATEGIES:
            try:
                build_strategy(self.gradient, self.gradient_options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"QPAConfig.gradient_options: {e}") from None
        elif self.gradient_options:
            raise ValueError("QPAConfig.gradient_options: set gradient explicitly (not 'auto') to pass options to it")
        for name in ("r", "n_mlp", "qnn_depth", "quantum_update_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QPAConfig.{name} must be a positive int, got {v!r}")
        if self.shots is not None and (
            isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1
        ):
            raise ValueError(f"QPAConfig.shots must be a positive int or None (exact), got {self.shots!r}")
        if self.gradient == "autograd" and self.shots is not None:
            raise ValueError(
                "QPAConfig.gradient='autograd' needs shots=None; use 'parameter_shift' or 'spsa' with shots"
            )
        if self.mapping_widths is not None and not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in self.mapping_widths
        ):
            raise ValueError(f"QPAConfig.mapping_widths must be None or positive ints, got {self.mapping_widths}")
        if not isinstance(self.executor_options, dict):
            raise ValueError(f"QPAConfig.executor_options must be a dict, got {self.executor_options!r}")
        check_executor_options(self.executor, self.executor_options)
        b = self.param_budget
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 < b <= 10:
            raise ValueError(f"QPAConfig.param_budget must be a fraction of LoRA's count in (0, 10], got {b!r}")
