"""qpeft_core.train.models: tiny test models, the bundled encoder and SmolLM2, all offline."""

import math
import os

import pytest
import torch

from qpeft_core.train import evaluate, lm_blocks, load_model, make_lora_model, read_texts


@pytest.mark.parametrize(
    ("name", "task"),
    [("tiny-gpt2", "causal_lm"), ("tiny-llama", "causal_lm"), ("tiny-bert", "seq_cls"), ("tiny-llama", "seq_cls")],
)
def test_tiny_models(name, task):
    model, tok = load_model(name, task=task, num_labels=3, device="cpu")
    again, _ = load_model(name, task=task, num_labels=3, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) <= 512
    batch = tok(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == ((2, batch["input_ids"].shape[1], 512) if task == "causal_lm" else (2, 3))


def test_errors():
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(ValueError, match="task='seq_cls'"):
        load_model("tiny-bert", device="cpu")
    with pytest.raises(ValueError, match="task="):
        load_model("tiny-gpt2", task="generation", device="cpu")


def test_minilm_offline_with_lora():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by qpeft_core.train.models on import
    model, tok = load_model("all-minilm-l6-v2", task="seq_cls", num_labels=2, device="cpu")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    lora = make_lora_model(model, ["query", "value"], r=8, alpha=16)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    out = lora(**tok(["a charming and often affecting journey"], return_tensors="pt"))
    assert out.logits.shape == (1, 2)


@pytest.mark.slow
def test_smollm2_perplexity(shared_data):
    model, tok = load_model("smollm2-135m", device="cpu")  # first call converts the GGUF and caches it
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    data = lm_blocks(read_texts(shared_data / "wikitext-2" / "test.txt"), tok, 256, max_tokens=1100)
    m = evaluate(model, data, batch_size=2, max_tokens=1020)
    assert m["tokens"] == 1020 and math.isfinite(m["ppl"]) and 20 < m["ppl"] < 80, m
