"""The adapter toolkit shared by every method: injection, wrapper, save/load, merge, LoRA export, errors.

Tiny random-initialised transformers models only; QPA is the method under test unless a test registers
its own minimal method to check the contract itself.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D

from qpeft_core import QPAConfig, QPEFTModel, get_qpeft_model
from qpeft_core.adapters import AdaptedLinear, AdapterConfig, AdapterMethod, config_from_dict, register_method
from qpeft_core.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from qpeft_core.adapters.qpa.generator import REFERENCE_WIDTHS
from qpeft_core.train import load_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def gpt2():
    return load_model("tiny-gpt2", device="cpu")[0].eval()


def llama():
    return load_model("tiny-llama", device="cpu")[0].eval()


def bert():
    return load_model("tiny-bert", task="seq_cls", num_labels=3, device="cpu")[0].eval()


MODELS = {
    "gpt2": (gpt2, ["c_attn", "c_fc", "lm_head"], []),
    "llama": (llama, ["q_proj", "v_proj", "down_proj", "lm_head"], []),
    "bert": (bert, ["query", "value"], ["classifier"]),
}
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def qpa(targets, saves=(), **kw):
    kw = {"mapping_widths": REFERENCE_WIDTHS, **kw}  # with n_mlp 512, the tiny targets leave no room for a half budget
    return QPAConfig(target_modules=targets, modules_to_save=list(saves), r=2, n_mlp=512, qnn_depth=2, **kw)


def wrapped(kind, **kw):
    make, targets, saves = MODELS[kind]
    model = get_qpeft_model(make(), qpa(targets, saves, **kw)).eval()
    with torch.no_grad():  # move off the zero-update start so every check below sees a real Delta W
        model.method.gate.uniform_(0.5, 1.5)
        for name in saves:
            model.base_model.get_submodule(name).weight.add_(0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --- injection and the wrapper ---------------------------------------------------------------------------


def test_injection_freezes_base_and_counts():
    base = gpt2()
    n_base = sum(p.numel() for p in base.parameters())
    model = get_qpeft_model(base, qpa(["c_attn", "lm_head"]))
    adapted = [n for n, m in model.base_model.named_modules() if isinstance(m, AdaptedLinear)]
    assert adapted == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "lm_head"]
    assert all(not p.requires_grad for p in model.base_model.parameters())
    n_method = sum(p.numel() for p in model.method.parameters())
    assert model.get_nb_trainable_parameters() == (n_method, n_base + n_method)
    assert model.config is base.config and model.device == torch.device("cpu")  # attribute passthrough


def test_print_trainable_parameters(capsys):
    model = get_qpeft_model(gpt2(), qpa(["lm_head"]))
    model.print_trainable_parameters()
    t, a = model.get_nb_trainable_parameters()
    assert (
        capsys.readouterr().out.strip()
        == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"
    )


def test_target_matching_list_and_regex():
    m1 = get_qpeft_model(llama(), qpa(["q_proj"]))
    assert list(m1.method.targets) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    m2 = get_qpeft_model(llama(), qpa(r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert list(m2.method.targets) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    t = m2.method.targets["model.layers.1.self_attn.v_proj"]
    assert (t.d_in, t.d_out) == (64, 32)  # 2 kv heads of 16


@pytest.mark.parametrize("kind", list(MODELS))
def test_zero_update_at_init(kind):
    make, targets, saves = MODELS[kind]
    ref = logits(make())
    assert torch.equal(logits(get_qpeft_model(make(), qpa(targets, saves)).eval()), ref)


def test_generate_and_modes():
    model = wrapped("gpt2")
    out = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    model.train()
    assert model.base_model.training and model.method.training
    model.eval()
    assert not model.base_model.training


def test_no_grad_factors_are_cached_and_deepcopy_works():
    model = wrapped("gpt2")
    calls = []
    orig = model.method.factors
    model.method.factors = lambda: calls.append(1) or orig()
    logits(model)
    logits(model)
    assert len(calls) == 1  # parameters unchanged: the second no-grad forward reuses the factors
    with torch.no_grad():
        model.method.gate.mul_(2)  # an in-place update (as an optimizer does) invalidates the cache
    logits(model)
    assert len(calls) == 2
    del model.method.factors
    model(input_ids=IDS).logits.sum().backward()  # leaves a graph on the adapted layers
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone), logits(model))


# --- save / load ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_save_load_exact(kind, tmp_path):
    model = wrapped(kind)
    ref = logits(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["method"] == "qpa" and cfg["modules_to_save"] == MODELS[kind][2]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / WEIGHTS_NAME)).keys()
    assert all(k.startswith(("method.", "extra.", "modules_to_save.")) for k in keys)  # adapter state only
    if kind == "bert":
        assert {"modules_to_save.classifier.weight", "modules_to_save.classifier.bias"} <= set(keys)
    loaded = QPEFTModel.from_pretrained(MODELS[kind][0](), tmp_path).eval()
    assert torch.equal(logits(loaded), ref)
    assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_modules_to_save_are_trained():
    model = wrapped("bert")
    head = model.base_model.classifier
    assert head.weight.requires_grad and not model.base_model.bert.embeddings.word_embeddings.weight.requires_grad
    out = model(input_ids=IDS, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert head.weight.grad is not None and model.method.gate.grad is not None


# --- merge and export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_merge_and_unload_matches(kind):
    model = wrapped(kind)
    ref = logits(model)
    emb = model.base_model.get_input_embeddings().weight.detach().clone()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLinear) for m in plain.modules())
    assert torch.allclose(logits(plain), ref, atol=1e-5)
    assert torch.equal(plain.get_input_embeddings().weight, emb)  # a tied lm_head was untied, not shared-edited
    if kind == "gpt2":
        assert plain.lm_head.weight is not plain.transformer.wte.weight
        assert plain.config.tie_word_embeddings is False


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_lora_loads_in_peft(kind, tmp_path):
    from peft import PeftModel

    model = wrapped(kind)
    ref = logits(model)
    model.export_lora(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 2
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    peft_model = PeftModel.from_pretrained(MODELS[kind][0](), tmp_path).eval()
    assert torch.allclose(logits(peft_model), ref, atol=1e-5)


# --- the contract, with a minimal method of the test's own ------------------------------------------------


from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402


@dataclass
class PlainLoRAConfig(AdapterConfig):
    method: ClassVar[str] = "test-plain-lora"
    ranks: dict = None  # full name -> rank


class PlainLoRA(AdapterMethod):
    """LoRA with its own rank per target, to check the contract and rank_pattern export."""

    def __init__(self, config, targets):
        super().__init__(config, targets)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for i, t in enumerate(targets.values()):
            r = (config.ranks or {}).get(t.name, 1 + i % 3)
            self.A[str(i)] = nn.Parameter(torch.randn(r, t.d_in) * 0.1)
            self.B[str(i)] = nn.Parameter(torch.zeros(t.d_out, r))

    def factors(self):
        return {t.name: (self.A[str(i)], self.B[str(i)]) for i, t in enumerate(self.targets.values())}

    def export_factors(self):  # a different split with the same products
        return {k: (2 * a, b / 2) for k, (a, b) in self.factors().items()}


register_method("test-plain-lora", PlainLoRAConfig, PlainLoRA)


def test_custom_method_contract(tmp_path):
    from peft import PeftModel

    model = get_qpeft_model(gpt2(), PlainLoRAConfig(target_modules=["c_attn", "c_proj", "lm_head"]))
    assert torch.equal(logits(model), logits(gpt2()))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        model.before_optimizer_step()
        opt.step()
        opt.zero_grad()
    ref = logits(model)
    model.save_pretrained(tmp_path / "ours")
    assert torch.equal(logits(QPEFTModel.from_pretrained(gpt2(), tmp_path / "ours")), ref)
    model.export_lora(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]  # ranks 1, 2, 3 mixed
    peft_model = PeftModel.from_pretrained(gpt2(), tmp_path / "lora").eval()
    assert torch.allclose(logits(peft_model), ref, atol=1e-5)


def test_conv1d_and_linear_layer_math():
    torch.manual_seed(0)
    conv, lin = Conv1D(5, 3), nn.Linear(3, 5)  # both 3 -> 5
    a, b = torch.randn(2, 3), torch.randn(5, 2)
    x = torch.randn(4, 3)
    for base in (conv, lin):
        layer = AdaptedLinear(base, "x")
        layer.delta = (a, b)
        want = base(x) + x @ (b @ a).T
        assert torch.allclose(layer(x), want, atol=1e-6)
        assert torch.allclose(copy.deepcopy(layer).merged(a, b)(x), want, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------------


def test_missing_target_names_pattern_and_available():
    with pytest.raises(ValueError, match=r"'nope'.*available Linear/Conv1D modules: .*c_attn"):
        get_qpeft_model(gpt2(), qpa(["c_attn", "nope"]))
    with pytest.raises(ValueError, match="not nn.Linear or Conv1D"):
        get_qpeft_model(gpt2(), qpa(["attn"]))
    with pytest.raises(ValueError, match="overlaps"):
        get_qpeft_model(bert(), qpa(["classifier"], ["classifier"]))
    model = get_qpeft_model(gpt2(), qpa(["lm_head"]))
    with pytest.raises(ValueError, match="already has qpeft adapters"):
        get_qpeft_model(model.base_model, qpa(["c_attn"]))


def test_unknown_method_and_bad_config():
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        config_from_dict({"method": "nope", "target_modules": ["x"]})
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({**qpa(["x"]).to_dict(), "bogus": 1})
    assert config_from_dict(qpa(["x"], shots=100).to_dict()) == qpa(["x"], shots=100)
    with pytest.raises(ValueError, match="target_modules is empty"):
        QPAConfig()


def _untouched(model):
    return not any(isinstance(m, AdaptedLinear) for m in model.modules()) and all(
        p.requires_grad for p in model.parameters()
    )


def test_load_errors_leave_base_untouched(tmp_path):
    model = wrapped("gpt2")
    model.save_pretrained(tmp_path / "ok")
    cfg_text = (tmp_path / "ok" / CONFIG_NAME).read_text()
    blob = (tmp_path / "ok" / WEIGHTS_NAME).read_bytes()

    def variant(name, cfg=cfg_text, weights=blob):
        d = tmp_path / name
        d.mkdir()
        (d / CONFIG_NAME).write_text(cfg)
        (d / WEIGHTS_NAME).write_bytes(weights)
        return d

    cases = [
        (variant("truncated", weights=blob[: len(blob) // 2]), "corrupt or truncated", gpt2),
        (variant("garbage", weights=b"\x00" * 64), "corrupt or truncated", gpt2),
        (variant("badjson", cfg=cfg_text[:40]), "not valid JSON", gpt2),
        (variant("method", cfg=cfg_text.replace('"qpa"', '"nope"', 1)), "unknown adapter method 'nope'", gpt2),
        (variant("rank", cfg=cfg_text.replace('"r": 2', '"r": 3')), r"adapter_model.safetensors does not match", gpt2),
        (
            tmp_path / "ok",
            "module lm_head is 64 -> 256 here but 64 -> 512 in the adapter",
            lambda: _gpt2(n_embd=64, vocab_size=256),
        ),
        (tmp_path / "ok", "h.1.attn.c_attn.*missing here", lambda: _gpt2(n_layer=1)),
        (tmp_path / "ok", "matches no module", llama),
        (tmp_path / "missing", "not found", gpt2),
    ]
    for directory, message, make in cases:
        base = make()
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            QPEFTModel.from_pretrained(base, directory)
        assert _untouched(base), directory


def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw}))


def test_peft_adapter_is_refused_by_our_loader(tmp_path):
    wrapped("gpt2").export_lora(tmp_path)
    with pytest.raises(ValueError, match="HF PEFT adapter"):
        QPEFTModel.from_pretrained(gpt2(), tmp_path)
