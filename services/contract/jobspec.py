"""JobSpec: what a user submits and what the trainer runs, validated once at the edge.

The control plane validates a spec when it is submitted (or estimated) and writes it as JSON; the trainer
(`python -m services.trainer --spec <path>`) reads the same file with `JobSpec.load(path)`. Errors are
pydantic errors whose location names the field (`method_config.r`, `dataset.train`, ...) and whose
message says how to fix it. Types are strict: an integer or boolean field takes only a JSON integer or
boolean (`"100"`, `true` or `2.0` for an int are refused), a number field a JSON number; method_config's
fields are checked the same way against the method's dataclass, and r and n_mlp have caps (CAPS).

Methods and their config (`method_config`, checked against the method's config dataclass):
- "qpa": qpeft_core.adapters.QPAConfig fields, except executor / shots / gradient, which are top-level here;
- "quantum_peft": qpeft_core.adapters.QuantumPEFTConfig fields (runs classically: executor must be "exact");
- "lora": r, lora_alpha, lora_dropout, target_modules (HF PEFT LoRA, the classical baseline).
`target_modules` may be left out: `default_target_modules(base_model)` fills it in.

What a spec may name, by validation context (pydantic's `context=`):
- none (FastAPI's parse of a request, library use): the form only; no file is looked at;
- {"access": Access(...)} (the control plane, per tenant): `dataset.train` / `dataset.eval` are a shared name,
  one of the tenant's uploaded data set ids, or a file under an operator-allowed root; `base_model` a known
  name, a checkpoint under an operator-allowed root, or a hub id the server holds. Everything else, existing
  or not, gets the same "not found" answer. The server paths go into `resolved`;
- {"trusted": True} (the trainer reading the spec file the control plane wrote): `resolved` is read as is.
A spec from a tenant never carries `resolved`, so the trainer reads only what the control plane resolved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from qpeft_core.adapters import METHODS as ADAPTER_METHODS
from qpeft_core.adapters.config import lookup_method

POOL_WORKERS = 2  # quantum workers a job's pool starts (the trainer's --pool-workers default); the forecast's too

# the registered adapter methods (qpeft_core.adapters.METHODS: a new method registers there) and HF PEFT's LoRA
METHODS = (*ADAPTER_METHODS, "lora")
TASKS = ("causal_lm", "seq_cls")
GRADIENTS = ("auto", "autograd", "parameter_shift", "spsa")
KNOWN_MODELS = ("smollm2-135m", "all-minilm-l6-v2", "tiny-gpt2", "tiny-llama", "tiny-bert")

# Shared data sets by name, relative to $QPEFT_SHARED_DATA (default: ../shared/data next to the repo).
SHARED_DATASETS = {
    "wikitext-2": "wikitext-2/valid.txt",
    "wikitext-2-test": "wikitext-2/test.txt",
    "sst2": "glue/SST-2/train.tsv",
    "sst2-dev": "glue/SST-2/dev.tsv",
    "tinyshakespeare": "tinyshakespeare/input.txt",
    "e2e-dev": "e2e_nlg/devset.csv",
    "e2e-test": "e2e_nlg/testset_w_refs.csv",
}

# Linear layers adapted when the spec names none: attention projections, as HF PEFT's defaults do.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
}
_MODEL_FAMILY = {
    "tiny-gpt2": "gpt2",
    "tiny-llama": "llama",
    "smollm2-135m": "llama",
    "tiny-bert": "bert",
    "all-minilm-l6-v2": "bert",
}

DATASET_ID = re.compile(r"ds_[0-9a-f]{16}")  # an uploaded data set (POST /v1/datasets)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]  # config, weights, tokenizer
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # 'org/name' on the Hugging Face hub

# Keys that would carry IBM credentials: those live in the cluster's saved account, never in a spec
# (a spec is stored in the database and returned by the API).
SECRET_OPTION = re.compile(r"token|secret|password|api[_-]?key|credential", re.I)


def shared_data_dir() -> Path:
    env = os.environ.get("QPEFT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"  # beside the checkout


def _local(path: str) -> Path:
    try:
        return Path(path).expanduser()
    except RuntimeError:  # '~someone' with no such user: take it literally
        return Path(path)


def _is(path: Path, kind: str) -> bool:
    """path.is_file() / exists() that answer False for names the OS rejects (too long, NUL bytes)."""
    try:
        return path.is_file() if kind == "file" else path.exists()
    except (OSError, ValueError):
        return False


def resolve_dataset(name_or_path: str) -> Path:
    """A shared-data name (see SHARED_DATASETS) or a local file path, as an existing file's path."""
    path = (
        shared_data_dir() / SHARED_DATASETS[name_or_path] if name_or_path in SHARED_DATASETS else _local(name_or_path)
    )
    if not _is(path, "file"):
        raise FileNotFoundError(f"data set {name_or_path!r} not found at {str(path)!r}")
    return path


def _under(name: str, roots, kind: str) -> Path | None:
    """The real path of an absolute `name` when it lies under one of `roots` after symlinks and '..' are
    resolved, and is a file (kind 'file') or a directory ('dir'); else None."""
    if not roots or not name.startswith("/"):
        return None
    try:
        real = Path(os.path.realpath(name))
        if not any(real.is_relative_to(os.path.realpath(root)) for root in roots):
            return None
        return real if (real.is_file() if kind == "file" else real.is_dir()) else None
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Access:
    """What one tenant's spec may name on this server (the control plane builds one per request and job).

    `uploaded(id)` is the file of the tenant's own uploaded data set, or None (another tenant's or no such id).
    Every lookup answers a server path or None, so absent and forbidden look the same to the caller."""

    uploaded: Callable[[str], Path | None]
    data_roots: tuple[Path, ...] = ()
    model_roots: tuple[Path, ...] = ()
    hub_cache: Path | None = None
    hub_online: bool = False

    def dataset(self, name: str) -> Path | None:
        if name in SHARED_DATASETS:
            try:
                return resolve_dataset(name)
            except FileNotFoundError:  # the operator has not laid out that shared set
                return None
        if DATASET_ID.fullmatch(name):
            return self.uploaded(name)
        return _under(name, self.data_roots, "file")

    def model(self, name: str) -> str | None:
        if name.lower() in KNOWN_MODELS:
            return name.lower()
        if name.startswith("/"):
            found = _under(name, self.model_roots, "dir")
            return None if found is None else str(found)
        if HUB_ID.fullmatch(name):
            return self._hub_snapshot(name)
        return None

    def _hub_snapshot(self, repo_id: str) -> str | None:
        """The local snapshot of a hub model: downloaded when the server is online, else from its cache."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            path = snapshot_download(
                repo_id, cache_dir=self.hub_cache, local_files_only=not self.hub_online, allow_patterns=HUB_FILES
            )
        except (OSError, ValueError, HFValidationError):  # not cached, not on the hub, or no network
            return None
        return path if (Path(path) / "config.json").is_file() else None


def hub_online() -> bool:
    """The server may fetch hub models only when HF_HUB_OFFLINE is set to a false value (it is 1 by default)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def default_target_modules(base_model: str) -> list[str] | None:
    family = _MODEL_FAMILY.get(base_model.lower())
    if family is None:  # a local checkpoint: guess from its config.json's model_type
        try:
            family = json.loads((_local(base_model) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
    targets = DEFAULT_TARGETS.get(family or "")
    return list(targets) if targets else None


FIXES = {
    "dataset_not_found": "upload the file (POST /v1/datasets, `qpeft data upload FILE`) and name its id, "
    f"or name a shared data set ({', '.join(SHARED_DATASETS)})",
    "base_model": f"use a known model ({', '.join(KNOWN_MODELS)}), a model directory the operator allowed, "
    "or a hub id the server holds",
    "resolved": "remove it: the server fills it in",
    "executor": "use an executor listed by GET /v1/backends",
    "secret_in_spec": "remove the credential; configure the IBM account on the cluster",
    "executor_options": "readout_mitigation 'mthree' with an aer-noisy:, fake-ibm: or ibm: executor, or remove it",
    "shots": "set shots (e.g. 1024) or use executor 'exact'",
    "gradient": "use 'parameter_shift', 'spsa' or 'shot_adaptive', or the exact executor without shots",
    "gradient_options": "use the options the strategy lists, with numbers",
    "task": "use task 'seq_cls' for encoders",
    "method_config": "change method_config as the message says",
}


def _err(kind: str, message: str, fix: str | None = None) -> PydanticCustomError:
    """A validation error whose context carries the fix (the API's error handler reports it)."""
    text = message.replace("{", "(").replace("}", ")")
    return PydanticCustomError(kind, text, {"fix": fix or FIXES.get(kind, "")})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class DataSpec(_Model):
    """Training (and evaluation) data: an uploaded data set, a shared-data name or an allowed server file
    (.txt/.jsonl/.csv/.tsv)."""

    train: str = Field(
        min_length=1,
        max_length=1000,
        description=f"an uploaded data set's id (ds_...), a shared-data name ({', '.join(SHARED_DATASETS)}), "
        "or a file under a root the operator allowed",
    )
    eval: str | None = Field(None, max_length=1000, description="held-out data, same forms as train; none: train")
    mode: Literal["packed", "lines"] = Field("packed", description="causal_lm: packed blocks or one line each")
    max_length: int = Field(128, strict=True, ge=8, le=8192, description="tokens per block / example")
    text_field: str | None = Field(None, description="column with the text (csv/tsv/jsonl); default text|sentence")
    label_field: str = Field("label", description="seq_cls: column with the integer label")
    limit: int | None = Field(
        None, strict=True, ge=1, description="keep a seeded subset of this many training examples"
    )
    eval_limit: int | None = Field(None, strict=True, ge=1, description="keep this many evaluation examples")
    num_labels: int = Field(2, strict=True, ge=2, le=1000, description="seq_cls: number of classes")


class Resolved(_Model):
    """Server paths the control plane resolved for one tenant's names; written into the trainer's spec file."""

    train: str
    eval: str | None = None
    base_model: str


class Scaling(_Model):
    num_workers: int = Field(
        1, strict=True, ge=1, le=256, description="data-parallel trainer replicas (Ray Train workers)"
    )
    use_gpu: bool = Field(False, strict=True, description="one GPU per worker")


class TrainingSpec(_Model):
    """Optimiser and loop settings (qpeft_core.train.TrainConfig)."""

    batch_size: int = Field(8, strict=True, ge=1, le=4096)
    grad_accum: int = Field(1, strict=True, ge=1, le=1024, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, strict=True, gt=0, le=10)
    weight_decay: float = Field(0.0, strict=True, ge=0, le=10)
    lr_scale: dict[str, Annotated[float, Field(strict=True, gt=0, le=1000)]] = Field(
        default_factory=dict,
        description='{regex on a trainable parameter\'s name: LR multiplier}, e.g. {"gate": 10}; first match wins',
    )
    warmup_steps: int = Field(0, strict=True, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, strict=True, gt=0)
    eval_every: int = Field(0, strict=True, ge=0, description="optimizer steps between evaluations; 0: only at the end")
    eval_at_start: bool = Field(
        False, strict=True, description="also evaluate before the first step (step 0), for a before/after comparison"
    )
    eval_batch_size: int = Field(8, strict=True, ge=1, le=4096)
    eval_max_batches: int | None = Field(None, strict=True, ge=1)
    save_every: int = Field(
        0, strict=True, ge=0, description="optimizer steps between checkpoints; 0: end and stop only"
    )
    seed: int = Field(0, strict=True, ge=0, le=2**32 - 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("lr_scale")
    @classmethod
    def _regexes(cls, v: dict) -> dict:
        if v:
            from qpeft_core.train.loop import lr_scale_patterns

            lr_scale_patterns(v)  # the trainer's own check, at submit
        return v


@dataclasses.dataclass
class LoRAConfig:
    """The classical baseline's fields (HF PEFT LoRA)."""

    method = "lora"
    target_modules: list[str] | str = dataclasses.field(default_factory=list)
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self):
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty; name the Linear layers to adapt")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if not 0 <= float(self.lora_dropout) < 1:
            raise ValueError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


@functools.cache
def config_class(method: str) -> type:
    return LoRAConfig if method == "lora" else lookup_method(method)[0]


# set on the JobSpec, not in method_config
TOP_LEVEL = {"executor": "executor", "shots": "shots", "gradient": "gradient", "gradient_options": "gradient_options"}

# Documented caps on method_config, whatever the model: QPA's mapping MLP has an output layer of n_mlp x width
# weights, and a LoRA rank beyond MAX_RANK is no longer parameter-efficient. The control plane also bounds r
# and n_mlp by the targeted layers' sizes (services/control_plane/limits.py).
MAX_RANK = 1024
MAX_N_MLP = 65536
CAPS = {"r": MAX_RANK, "n_mlp": MAX_N_MLP}
STRICT_FIXES = {  # by pydantic's error type, up to its first '_'
    "int": "send an integer (not a string, a boolean or a number with a fraction)",
    "float": "send a number (not a string or a boolean)",
    "bool": "send true or false",
    "string": "send a string",
    "list": "send a JSON array",
    "dict": "send a JSON object",
}


@functools.cache
def _field_types(cls: type) -> dict[str, TypeAdapter]:
    """A strict validator per field of a method's config dataclass, from its annotations: JSON '4', 4.0
    or true never stand in for the int 4 (floats still take ints)."""
    hints = typing.get_type_hints(cls)
    strict = ConfigDict(strict=True)
    return {f.name: TypeAdapter(hints[f.name], config=strict) for f in dataclasses.fields(cls)}


def _check_types(cls: type, cfg: dict) -> None:
    adapters = _field_types(cls)
    for key, value in cfg.items():
        try:
            adapters[key].validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]
            fix = STRICT_FIXES.get(first["type"].partition("_")[0], "send a value of the field's type")
            raise _err("method_config", f"method_config.{key}: {first['msg']}", fix) from None
        cap = CAPS.get(key)
        if cap is not None and value > cap:
            raise _err(
                "method_config",
                f"method_config.{key}: {value} is above the limit of {cap}",
                f"use {key} <= {cap}",
            )


def _check_types_of(options: dict) -> None:
    """gradient_options hold numbers: a JSON string or boolean is refused rather than coerced."""
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {type(value).__name__}")


def _config_error(method: str, message: str, fields: list[str]) -> PydanticCustomError:
    """The dataclasses raise 'QPAConfig.r must be ...': name the field as method_config.r for the caller."""
    m = re.search(r"\b\w+Config\.(\w+)", message)
    field = m.group(1) if m and m.group(1) in fields else None
    where = f"method_config.{field}" if field else "method_config"
    return _err("method_config", f"{where}: {message}")


def check_executor(spec: str) -> str:
    """The executor registry's parse (qpeft_core/quantum/registry.py), its message as the field's error."""
    from qpeft_core.quantum.registry import ExecutorSpec, ExecutorSpecError

    try:
        return ExecutorSpec.parse(spec).text
    except ExecutorSpecError as e:  # its reason: the error never repeats what was sent
        raise _err("executor", e.reason) from None


def runs_circuits(method: str) -> bool:
    """Whether the method runs quantum circuits while it trains (the method registry says; LoRA is HF PEFT's)."""
    if method == "lora":
        return False
    return bool(getattr(lookup_method(method)[1], "runs_circuits", False))


class JobSpec(_Model):
    """One fine-tuning job. Only base_model, dataset and method are required."""

    name: str | None = Field(None, max_length=120, description="a label for lists and the dashboard")
    base_model: str = Field(
        min_length=1, max_length=500, description=f"a known model ({', '.join(KNOWN_MODELS)}) or a local checkpoint"
    )
    dataset: DataSpec = Field(description="a shared-data name / local path, or a DataSpec object")
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    method: Literal[METHODS]
    method_config: dict[str, Any] = Field(default_factory=dict, description="fields of the method's config class")
    executor: str = Field(
        "exact",
        max_length=200,
        description="where circuits run: exact, aer, aer-noisy:<fake device>, "
        "fake-ibm:<fake device>, ibm:<backend> (qpeft_core/quantum/registry.py; GET /v1/backends lists them)",
    )
    executor_options: dict[str, Any] = Field(default_factory=dict, description="options for the executor")
    shots: Annotated[int, Field(strict=True, ge=1, le=10_000_000)] | None = Field(
        None, description="per circuit; none: exact"
    )
    gradient: Literal["auto", "autograd", "parameter_shift", "spsa", "shot_adaptive"] = Field(
        "auto",
        description="how the QNN's angles get their gradient: auto (autograd when exact, else parameter_shift), "
        "parameter_shift, spsa (seeded; samples averaged, decaying perturbation), shot_adaptive (parameter "
        "shift with shots per angle from the estimated noise, at most `shots`)",
    )
    gradient_options: dict[str, Any] = Field(
        default_factory=dict,
        description='the strategy\'s settings, e.g. {"samples": 4, "decay": 0.101} (spsa), '
        '{"min_shots": 32, "snr": 4.0} (shot_adaptive)',
    )
    scaling: Scaling = Field(default_factory=Scaling)
    max_steps: int = Field(100, strict=True, ge=1, le=10_000_000, description="optimizer steps")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    shot_limit: int | None = Field(None, strict=True, ge=0, le=10**15, description="this job's own shot budget")
    qpu_seconds_limit: float | None = Field(
        None, strict=True, ge=0, le=1e9, description="this job's own QPU-time budget"
    )
    run_until_budget_ends: bool = Field(
        False,
        strict=True,
        description="train until the budget runs out instead of refusing a job forecast to exceed it",
    )
    resolved: SkipJsonSchema[Resolved | None] = None  # set by the control plane only (see the module docstring)

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_name(cls, v):
        return {"train": v} if isinstance(v, str) else v

    @field_validator("base_model")
    @classmethod
    def _model(cls, v):
        return v.lower() if v.lower() in KNOWN_MODELS else v

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo):
        """Runs before _consistent (pydantic runs after-validators in order), which needs the model's location."""
        context = info.context or {}
        if self.resolved is not None and not context.get("trusted"):
            raise _err("resolved", "resolved: the server sets this; a spec may not")
        access = context.get("access")
        if access is not None:
            self.resolved = Resolved(
                train=self._dataset_path(access, "train"),
                eval=self._dataset_path(access, "eval"),
                base_model=self._model_location(access),
            )
        return self

    def _dataset_path(self, access: Access, which: str) -> str | None:
        name = getattr(self.dataset, which)
        if name is None:
            return None
        path = access.dataset(name)
        if path is None:  # the same words whether it is absent or not the tenant's: no existence oracle
            raise _err("dataset_not_found", f"dataset.{which}: data set {name!r} not found among yours")
        return str(path)

    def _model_location(self, access: Access) -> str:
        where = access.model(self.base_model)
        if where is None:
            raise _err("base_model", f"base_model: model {self.base_model!r} not found; use a known model or yours")
        return where

    def model_location(self) -> str:
        """Where the trainer loads base_model from: the resolved server path, else the name itself."""
        return self.resolved.base_model if self.resolved else self.base_model

    def data_path(self, which: str = "train") -> Path | None:
        """The file of dataset.train / dataset.eval (None when eval is not set): the resolved server path, or
        for a spec without one (library use on one's own machine) a shared name or a local path."""
        if self.resolved is not None:
            value = getattr(self.resolved, which)
            return None if value is None else Path(value)
        value = getattr(self.dataset, which)
        return None if value is None else resolve_dataset(value)

    @field_validator("executor")
    @classmethod
    def _executor(cls, v):
        return check_executor(v)

    @field_validator("executor_options")
    @classmethod
    def _no_secrets(cls, v):
        bad = [k for k in v if SECRET_OPTION.search(str(k))]
        if bad:
            raise _err(
                "secret_in_spec",
                f"executor_options {bad} look like credentials; a spec is stored and shown, so configure the "
                "IBM account on the cluster (QiskitRuntimeService.save_account or QISKIT_IBM_TOKEN) instead",
            )
        return v

    @model_validator(mode="after")
    def _consistent(self):
        from qpeft_core.quantum.registry import ExecutorSpec, check_executor_options

        if not runs_circuits(self.method) and self.executor != "exact":
            raise _err(
                "executor", f"executor: method {self.method!r} runs classically; use executor 'exact' (or method 'qpa')"
            )
        try:
            check_executor_options(self.executor, self.executor_options)
        except ValueError as e:
            raise _err("executor_options", f"executor_options: {e}") from None
        if ExecutorSpec.parse(self.executor).needs_shots and self.shots is None:
            raise _err("shots", f"shots: executor {self.executor!r} samples circuits; set shots, e.g. 1024")
        if self.gradient == "shot_adaptive" and self.shots is None:
            raise _err("shots", "shots: gradient 'shot_adaptive' chooses shots per circuit up to `shots`; set shots")
        if self.gradient_options:
            from qpeft_core.quantum.gradients import build_strategy

            if self.gradient == "auto":
                raise _err("gradient", "gradient_options: name the strategy in `gradient` to give it options")
            try:
                _check_types_of(self.gradient_options)
                build_strategy(self.gradient, self.gradient_options)
            except (TypeError, ValueError) as e:
                raise _err("gradient_options", f"gradient_options: {e}") from None
        if self.gradient == "autograd" and (self.shots is not None or self.executor != "exact"):
            raise _err(
                "gradient",
                "gradient: 'autograd' needs the exact torch simulator (executor 'exact', no shots); "
                "use 'parameter_shift' or 'spsa'",
            )
        if self.task == "causal_lm" and _MODEL_FAMILY.get(self.base_model) == "bert":
            raise _err("task", f"task: {self.base_model} is an encoder; use task 'seq_cls' or a decoder model")
        self.method_config = self._checked_method_config()
        return self

    def _checked_method_config(self) -> dict:
        cls = config_class(self.method)
        fields = [f.name for f in dataclasses.fields(cls)]
        cfg = dict(self.method_config)
        cfg.pop("method", None)
        quantum = runs_circuits(self.method)
        for key in cfg:
            if quantum and key in TOP_LEVEL:
                raise _err("method_config", f"method_config.{key}: set '{TOP_LEVEL[key]}' at the top level of the spec")
            if key not in fields:
                allowed = [f for f in fields if not (quantum and f in TOP_LEVEL)]
                raise _err("method_config", f"method_config.{key}: unknown field for {self.method}; known: {allowed}")
        _check_types(cls, cfg)
        if not cfg.get("target_modules"):
            known = self.base_model in _MODEL_FAMILY or self.resolved is not None
            if not known:  # a name no one resolved yet (FastAPI's parse): the resolving pass fills this in
                return cfg
            targets = default_target_modules(self.model_location())
            if targets is None:
                raise _err(
                    "method_config",
                    f"method_config.target_modules: no default for {self.base_model!r}; name the Linear layers",
                )
            cfg["target_modules"] = targets
        try:
            self.adapter_config(cfg)
        except (TypeError, ValueError) as e:
            raise _config_error(self.method, str(e), fields) from None
        return cfg

    def resolved_gradient(self) -> str:
        """The strategy the trainer uses: 'auto' resolved by qpeft_core's one rule for this executor."""
        from qpeft_core.quantum.gradients import resolve_gradient
        from qpeft_core.quantum.registry import ExecutorSpec

        return resolve_gradient(self.gradient, ExecutorSpec.parse(self.executor).differentiable, self.shots)

    def adapter_config(self, cfg: dict | None = None):
        """The method's config dataclass (QPAConfig / QuantumPEFTConfig / LoRAConfig), top-level fields merged."""
        cfg = dict(self.method_config if cfg is None else cfg)
        if runs_circuits(self.method):
            cfg.update(executor=self.executor, executor_options=self.executor_options)
            cfg.update(shots=self.shots, gradient=self.gradient, gradient_options=self.gradient_options)
        return config_class(self.method)(**cfg)

    # --- files -------------------------------------------------------------------------------------
    def dump(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path) -> JobSpec:
        """The spec file the control plane wrote (trusted: its `resolved` paths are read as they are)."""
        return cls.model_validate_json(Path(path).read_text(), context={"trusted": True})
