"""QPA as an adapter method: one QNN + mapping MLP generating the LoRA factors of every target.

The QNN runs once per set of angles, not once per forward. Its probabilities are kept as a leaf tensor
`probs` (requires_grad) for the angles they came from (keyed by the angle tensor's version counter, which
the optimizer's in-place update bumps); each forward maps `probs` to factors classically. dL/dtheta is a
vector-Jacobian product against dL/dprobs, linear in it, so it can be taken at every backward (a hook on
`probs`; plain `loss.backward(); opt.step()` loops just work) or once per optimizer step from the
accumulated `probs.grad` (`before_optimizer_step()`; one QNN forward and one gradient call per step
whatever the gradient-accumulation count). A data-parallel trainer all-reduces `probs.grad` before that
hook, so only one replica needs to talk to the QPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ...quantum.ansatz import qpa_ansatz
from ...quantum.backend import TorchBackend, Usage
from ...quantum.gradients import QNN
from ..model import AdapterMethod
from .generator import QPAGenerator, n_gates, resolve_widths

REFERENCE_LAST_LAYER_SCALE = 1e-3  # mapping="reference": start near Delta W = 0 without an extra parameter


class QPAMethod(AdapterMethod):
    runs_circuits = True

    def __init__(self, config, targets):
        super().__init__(config, targets)
        r = config.r
        self.m = sum(r * (t.d_in + t.d_out) for t in targets.values())
        gates = n_gates(config, len(targets))
        self.widths = resolve_widths(config, self.m, len(targets))
        self.generator = QPAGenerator(
            self.m,
            config.n_mlp,
            config.qnn_depth,
            self.widths,
            activation=config.activation,
            bit_features=config.bit_features,
            gamma=config.gamma,
            beta=config.beta,
            alpha=config.alpha,
            last_layer_scale=REFERENCE_LAST_LAYER_SCALE if config.mapping == "reference" else 1.0,
            seed=config.seed,
            p_mode=config.p_mode,
        )
        # LoRA starts at B = 0; here B comes out of the same MLP as A, so a per-target gate on B does that job
        self.gate = nn.Parameter(torch.zeros(gates)) if gates else None
        self.scaling = config.lora_alpha / r
        self.ansatz = qpa_ansatz(self.generator.n_qubits, config.qnn_depth, config.entangler)
        self.quantum_grad = config.quantum_grad
        self.usage = Usage(config.executor)
        self.calls = {"forward": 0, "gradient": 0}  # executor calls made by this method
        self._qnn, self._qnn_auto, self._warm_qnn = None, True, None
        self.steps_done = 0  # optimizer steps seen (the loop says which step it is when it can)
        self._pending, self._pending_n = None, 0  # dL/dp summed over the current quantum update period
        self.probs, self._probs_key, self._probs_theta = None, None, None
        self.rows = self._row_offsets() if config.layout == "rows" else None

    @property
    def n_qubits(self) -> int:
        return self.generator.n_qubits

    # --- the executor ------------------------------------------------------------------------------
    @property
    def qnn(self) -> QNN:
        """Built on first use from the config's executor; the exact simulator follows the angles' device."""
        device = self.generator.theta.device
        if self._qnn is None or (self._qnn_auto and self.config.executor == "exact" and self._qnn_device != device):
            from ...quantum.registry import make_backend

            opts = {"seed": self.config.seed, **self.config.executor_options}
            if self.config.executor == "exact":
                opts = {"device": device, "dtype": torch.float64, **opts}
            backend = make_backend(self.config.executor, self.ansatz, **opts)
            self._qnn = QNN(backend, self.config.gradient, self.config.shots, self.config.gradient_options)
            self._qnn_device, self._qnn_auto = device, True
        return self._qnn

    @property
    def active_qnn(self) -> QNN:
        """The QNN of this step: the exact simulator during warm_start_steps, then the configured executor."""
        if self.steps_done >= self.config.warm_start_steps:
            return self.qnn
        device = self.generator.theta.device
        if self._warm_qnn is None or self._warm_qnn.backend.device != device:
            self._warm_qnn = QNN(TorchBackend(self.ansatz, device=device, dtype=torch.float64, seed=self.config.seed))
        return self._warm_qnn

    def set_executor(self, executor) -> None:
        """Run circuits on `executor` (any QuantumBackend for this method's `ansatz`, e.g. a remote pool); the
        gradient strategy is the config's, resolved for that executor."""
        if executor.ansatz.n_qubits != self.n_qubits or executor.ansatz.n_params != self.ansatz.n_params:
            raise ValueError(f"executor runs a different circuit than this QPA's {self.ansatz.family} ansatz")
        cfg = self.config
        self._qnn, self._qnn_auto = QNN(executor, cfg.gradient, cfg.shots, cfg.gradient_options), False

    # --- quantum forward and gradient --------------------------------------------------------------
    def _key(self):
        theta = self.generator.theta
        return theta.data_ptr(), theta._version

    def quantum_probs(self) -> torch.Tensor:
        """The leaf `probs` [2^N] for the current angles; runs the executor only when the angles changed."""
        theta = self.generator.theta
        if (
            self.probs is not None
            and self._probs_key != self._key()
            and torch.equal(self._probs_theta, theta.detach().to(self._probs_theta.device))
        ):
            self._set_probs(self.probs)  # same angles in a new tensor (.to(), load): keep the measured p
        if self.probs is None or self._probs_key != self._key():
            probs, usage = self.active_qnn.forward(theta.detach()[None])
            self.usage, self.calls["forward"] = self.usage + usage, self.calls["forward"] + 1
            self._set_probs(probs[0])
        return self.probs

    def _set_probs(self, probs: torch.Tensor) -> None:
        theta = self.generator.theta
        p = probs.detach().to(theta.device, torch.float32).clone().requires_grad_(True)
        p.register_hook(self._on_probs_grad)
        self.probs, self._probs_key, self._probs_theta = p, self._key(), theta.detach().clone()

    def _on_probs_grad(self, grad):
        if self.quantum_grad == "per_backward" and self.config.quantum_update_every == 1:
            self._push_theta_grad(grad)

    def _push_theta_grad(self, grad_probs: torch.Tensor) -> None:
        theta = self.generator.theta
        if not theta.requires_grad:
            return
        g, usage = self.active_qnn.vjp(theta.detach()[None], grad_probs.detach()[None])
        self.usage, self.calls["gradient"] = self.usage + usage, self.calls["gradient"] + 1
        g = g[0].to(theta.device, theta.dtype)
        theta.grad = g if theta.grad is None else theta.grad + g

    def before_optimizer_step(self, average=None, step: int | None = None) -> None:
        """The angles' gradient for this optimizer step, from the accumulated dL/dp: once per step
        (quantum_grad="per_step"), or once per quantum_update_every steps from their mean. `average` (a
        data-parallel loop's mean over replicas) is applied to dL/dp first, so every replica sends the same
        VJP; `step` (optimizer steps already taken; counted here when a loop does not pass it) places the
        step in the warm start and the update period."""
        self.steps_done = self.steps_done if step is None else step
        p, k = self.probs, self.config.quantum_update_every
        if p is not None and p.grad is not None and (self.quantum_grad == "per_step" or k > 1):
            grad = p.grad if average is None else average(p.grad)
            self._pending = grad if self._pending is None else self._pending + grad
            self._pending_n += 1
            if (self.steps_done + 1) % k == 0:
                self._push_theta_grad(self._pending / self._pending_n)
                self._pending, self._pending_n = None, 0
        if p is not None:
            p.grad = None
        self.steps_done += 1

    def before_save(self) -> None:
        self.quantum_probs()  # extra_state saves them: measured here, on every replica, not on one alone

    # --- the contract ------------------------------------------------------------------------------
    def factors(self):
        raw = self.unflatten(self.generator(self.quantum_probs()))
        out = {}
        for k, (name, (a, b)) in enumerate(raw.items()):
            out[name] = (a, b * (self.scaling if self.gate is None else self.scaling * self.gate[k]))
        return out

    def unflatten(self, flat: torch.Tensor) -> dict:
        """The layout: each target's (A [r, d_in], B [d_out, r]) cut out of the flat [m] vector, unscaled.
        unflatten(torch.arange(m)) maps factor entries to generated positions (benchmarks/qpa_capacity.py)."""
        out, i, r = {}, 0, self.config.r
        for t in self.targets.values():
            if self.rows is not None:
                a = torch.stack([flat[s : s + t.d_in] for s in self.rows[t.name][0]])
                b = torch.stack([flat[s : s + t.d_out] for s in self.rows[t.name][1]]).T
            else:
                a = flat[i : i + r * t.d_in].view(r, t.d_in)
                i += r * t.d_in
                b = flat[i : i + t.d_out * r].view(t.d_out, r)
                i += t.d_out * r
            out[t.name] = (a, b)
        return out

    def _row_offsets(self) -> dict:
        """layout="rows": start offsets of each target's r A rows and r B columns in the flat vector."""
        r = self.config.r
        items = [(t.d_in, t.name, 0, j) for t in self.targets.values() for j in range(r)]
        items += [(t.d_out, t.name, 1, j) for t in self.targets.values() for j in range(r)]
        items.sort(key=lambda x: -x[0])  # stable: equal-length rows stay in target order
        rows, i = {t.name: ([0] * r, [0] * r) for t in self.targets.values()}, 0
        for length, name, which, j in items:
            rows[name][which][j] = i
            i += length
        return rows

    def extra_state(self):
        # the probabilities in use, so a loaded adapter reproduces outputs exactly (also after shot noise)
        # and inference after loading needs no executor
        return {"probs": self.quantum_probs().detach()}

    def load_extra_state(self, state):
        probs = state.get("probs")
        if set(state) != {"probs"} or probs is None or tuple(probs.shape) != (self.ansatz.dim,):
            raise ValueError(
                f"QPA adapter state must hold 'probs' of shape ({self.ansatz.dim},) for its {self.n_qubits}-qubit "
                f"QNN; got { ({k: tuple(v.shape) for k, v in state.items()}) }"
            )
        self._set_probs(probs)
