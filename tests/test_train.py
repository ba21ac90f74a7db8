"""qpeft_core.train: data formats, perplexity conventions, the loop (LoRA, resume, stop, hooks)."""

import json
import math

import pytest
import torch
from torch import nn

from qpeft_core.quantum.backend import Usage
from qpeft_core.train import (
    Batches,
    TokenData,
    TrainConfig,
    evaluate,
    lm_blocks,
    lm_lines,
    load_data,
    load_model,
    make_lora_model,
    perplexity,
    read_labeled,
    read_texts,
    train,
)
from qpeft_core.train.data import IGNORE
from qpeft_core.train.loop import param_groups
from qpeft_core.train.models import tiny_tokenizer

TEXT = "the cat sat on the mat . the dog sat on the log . " * 40


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- data


def test_read_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nthird line\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x y", "label": 1}\n{"text": "z", "label": 0}\n')
    (tmp_path / "a.csv").write_text('mr,ref\n"name[A], area[x]","A is, in x."\n')
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nit \'s "fine" \t1\nbad\t0\n')
    assert read_texts(tmp_path / "a.txt") == ["first line", "", "third line"]
    assert read_texts(tmp_path / "a.jsonl") == ["x y", "z"]
    assert read_texts(tmp_path / "a.csv", text_field="ref") == ["A is, in x."]
    assert read_labeled(tmp_path / "a.tsv") == [('it \'s "fine" ', 1), ("bad", 0)]
    assert read_labeled(tmp_path / "a.jsonl") == [("x y", 1), ("z", 0)]


def test_errors_name_the_field_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "nolabel.tsv").write_text("sentence\tscore\ngood\t0.9\n")
    with pytest.raises(KeyError, match="no label column 'label'.*label_field"):
        read_labeled(tmp_path / "nolabel.tsv")
    with pytest.raises(KeyError, match="text_field"):
        read_texts(tmp_path / "nolabel.tsv", text_field="text")
    (tmp_path / "badlabel.tsv").write_text("sentence\tlabel\ngood\tpositive\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_labeled(tmp_path / "badlabel.tsv")


def test_shared_wikitext_and_sst2(shared_data, tok):
    texts = read_texts(shared_data / "wikitext-2" / "valid.txt")[:300]
    blocks = lm_blocks(texts, tok, 64, max_tokens=2000)
    assert len(blocks) == 2000 // 64 and all(len(b) == 64 for b in blocks.input_ids)
    sst = shared_data / "glue" / "SST-2"
    sub = read_labeled(sst / "train.tsv", limit=50, seed=0)
    assert sub == read_labeled(sst / "train.tsv", limit=50, seed=0)  # seeded subset: same rows every time
    assert sub != read_labeled(sst / "train.tsv", limit=50, seed=1)
    assert len(sub) == 50 and {label for _, label in sub} == {0, 1}
    assert len(read_labeled(sst / "dev.tsv")) == 872
    with pytest.raises(KeyError, match="label"):  # GLUE's test split is unlabelled
        read_labeled(sst / "test.tsv")
    data = load_data(sst / "dev.tsv", tok, task="seq_cls", limit=8, max_length=32)
    batch = data.batch(range(4))
    assert data.kind == "cls" and batch["labels"].shape == (4,) and batch["input_ids"].shape[1] <= 32


def test_lines_mode_padding_and_labels(tok):
    data = lm_lines(["a b c", "", "hello"], tok, max_length=8)
    assert len(data) == 2  # empty lines skipped by default
    b = data.batch([0, 1])
    assert b["input_ids"].shape == (2, 8)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    ref = lm_lines(["a b c", "", "hello"], tok, max_length=8, pad_in_loss=True, skip_empty=False)
    assert len(ref) == 3 and (ref.batch([1])["labels"] == tok.pad_token_id).all()


def test_batches_seeded_and_resumable():
    full = Batches(10, 3, seed=7)
    seq = [full.next() for _ in range(8)]  # crosses two epoch boundaries (3 batches per epoch)
    again = Batches(10, 3, seed=7)
    first = [again.next() for _ in range(4)]
    resumed = Batches(10, 3, seed=7)
    resumed.load_state_dict(again.state_dict())
    assert first + [resumed.next() for _ in range(4)] == seq
    assert seq[0] != seq[3]  # a new order each epoch
    assert Batches(10, 3, seed=8).next() != seq[0]
    ranks = [Batches(10, 2, seed=7, rank=r, world=2) for r in range(2)]
    a, b = ranks[0].next(), ranks[1].next()
    assert not set(a) & set(b)


# ---------------------------------------------------------------- metrics


class FixedLM(nn.Module):
    """Vocab of 4, pad = 0. After a real token every next token has probability 1/4; after a pad the next
    token is a pad with probability 1 (log-prob exactly 0 in float32)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = torch.zeros(*input_ids.shape, 4)
        logits[input_ids == 0] = torch.tensor([0.0, -1e4, -1e4, -1e4])
        return {"logits": logits + self.dummy}


def test_perplexity_conventions_hand_computed():
    # Two lines padded to 4: [1 2 3 _] and [2 _ _ _]. Targets after the shift:
    #   line 1: 2, 3 (real, log 4 each), pad (after a real token: log 4)
    #   line 2: pad (after a real token: log 4), pad, pad (after pads: 0)
    data = TokenData("lm", [[1, 2, 3], [2]], pad_id=0, pad_to=4)
    m = evaluate(FixedLM(), data, batch_size=2)
    assert m["tokens"] == 2
    assert m["ppl"] == pytest.approx(4.0)  # standard: only the 2 real targets count
    assert m["ppl_ref"] == pytest.approx(4 ** (4 / 6))  # reference: 4 x log 4 over all 6 positions
    assert perplexity(FixedLM(), data, convention="reference") == pytest.approx(4 ** (4 / 6))
    assert evaluate(FixedLM(), data, max_tokens=1)["tokens"] == 1


def test_accuracy():
    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None):
            return {"logits": torch.stack([-input_ids[:, 0].float(), input_ids[:, 0].float()], -1) + self.w}

    data = TokenData("cls", [[1], [-1], [2], [3]], pad_id=0, labels=[1, 0, 0, 1])
    assert evaluate(Cls(), data, batch_size=3)["accuracy"] == 0.75


# ---------------------------------------------------------------- loop


def _lora_gpt2(targets=("c_attn", "lm_head"), dropout=0.0):
    model, tok = load_model("tiny-gpt2", device="cpu")
    return make_lora_model(model, targets, r=4, alpha=8, dropout=dropout), tok


def test_lora_training_reduces_loss(tmp_path):
    model, tok = _lora_gpt2()
    data = lm_blocks([TEXT], tok, 32)
    before = evaluate(model, data)["loss"]
    cfg = TrainConfig(max_steps=10, lr=3e-2, batch_size=4, warmup_steps=2, progress=False, device="cpu")
    result = train(model, tok, data, data, cfg)
    assert result.reason == "max_steps" and result.step == 10
    assert result.eval["loss"] < before - 1.0
    assert math.isfinite(result.eval["ppl"]) and result.eval["ppl_ref"] > 0


def _fields(history):
    return [(h["step"], h["loss"], h["lr"], h["grad_norm"], h.get("eval_loss")) for h in history]


def test_resume_is_bit_for_bit_and_should_stop(tmp_path):
    kw = dict(
        max_steps=10,
        batch_size=2,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        schedule="cosine",
        eval_every=5,
        eval_max_batches=1,
        progress=False,
        device="cpu",
        seed=3,
    )
    model, tok = _lora_gpt2(["c_attn"], dropout=0.1)  # dropout: the RNG state must be restored too
    data = lm_blocks([TEXT], tok, 16)
    straight = train(model, tok, data, data, TrainConfig(output_dir=str(tmp_path / "a"), **kw))
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = iter(range(1, 100))
    events = []
    model, tok = _lora_gpt2(["c_attn"], dropout=0.1)
    stopped = train(
        model,
        tok,
        data,
        data,
        TrainConfig(output_dir=str(tmp_path / "b"), **kw),
        step_callback=events.append,
        should_stop=lambda: next(calls) >= 5,
    )
    assert stopped.reason == "stopped" and stopped.step == 5
    assert stopped.checkpoint.endswith("checkpoint-00000005")
    assert (tmp_path / "b" / "checkpoint-00000005" / "adapter" / "adapter_config.json").is_file()
    assert [e["event"] for e in events][-2:] == ["checkpoint", "end"]

    model, tok = _lora_gpt2(["c_attn"], dropout=0.1)  # a fresh process would rebuild the model the same way
    resumed = train(model, tok, data, data, TrainConfig(output_dir=str(tmp_path / "b"), **kw))
    assert resumed.step == 10
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, want[n]), n
    assert _fields(resumed.history) == _fields(straight.history)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert _fields(lines) == _fields(straight.history) and len(lines) == 10


class CountingModel(nn.Module):
    """A stand-in quantum adapter: counts forwards and hook calls and reports quantum usage."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(512, 8)
        self.out = nn.Linear(8, 512)
        self.forwards = self.hooks = 0

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.forwards += 1
        logits = self.out(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)
        return {"loss": loss, "logits": logits}

    def before_optimizer_step(self):
        # after all backward passes of the step: the gradients are there, and the step has not happened
        assert self.out.weight.grad is not None
        self.hooks += 1

    def quantum_usage(self):
        return Usage(backend="fake", circuits=self.hooks, shots=1000 * self.hooks, job_ids=["j"] * self.hooks)


def test_before_optimizer_step_once_per_step_with_grad_accum(tmp_path, tok):
    model = CountingModel()
    data = lm_blocks([TEXT], tok, 16)
    events = []
    cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, output_dir=str(tmp_path), progress=False, device="cpu")
    result = train(model, tok, data, None, cfg, step_callback=events.append)
    assert model.hooks == 3 and model.forwards == 6
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [(line["circuits"], line["shots"]) for line in lines] == [(1, 1000), (2, 2000), (3, 3000)]
    assert lines[-1]["quantum"]["n_jobs"] == 3 and lines[-1]["quantum"]["backend"] == "fake"
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= lines[0].keys()
    assert result.quantum["shots"] == 3000
    assert [e["event"] for e in events] == ["start", "log", "log", "log", "checkpoint", "end"]


def test_config_errors(tok):
    model = nn.Linear(2, 2).requires_grad_(False)
    data = lm_blocks([TEXT], tok, 16)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tok, data, None, TrainConfig(max_steps=1, progress=False, device="cpu"))
    with pytest.raises(ValueError, match="schedule"):
        train(CountingModel(), tok, data, None, TrainConfig(schedule="step", progress=False, device="cpu"))


def test_lr_scale_groups_follow_the_schedule(tok):
    model, _ = _lora_gpt2(targets=("c_attn",))
    groups = param_groups(model, TrainConfig(lr=1e-2, lr_scale={r"lora_A": 1e-6, "lora_B": 2.0}))
    assert [(g["lr"], len(g["params"])) for g in groups] == [(pytest.approx(1e-8), 2), (pytest.approx(2e-2), 2)]
    a0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(max_steps=4, lr=1e-2, lr_scale={"lora_A": 1e-6}, warmup_steps=2, progress=False, device="cpu")
    train(model, tok, lm_blocks([TEXT], tok, 16), None, cfg)
    moved = {n: (p.detach() - a0[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert all(v < 1e-6 for n, v in moved.items() if "lora_A" in n)  # Adam steps are ~lr: 1e-8 here
    assert all(v > 1e-3 for n, v in moved.items() if "lora_B" in n)


def test_lr_scale_errors_name_the_pattern():
    model, _ = _lora_gpt2(targets=("c_attn",))
    with pytest.raises(ValueError, match=r"\['gatee'\] match no trainable parameter"):
        param_groups(model, TrainConfig(lr_scale={"lora_A": 2, "gatee": 10}))
    with pytest.raises(ValueError, match="TrainConfig.lr_scale: 'lora_\\(' is not a valid regular expression"):
        param_groups(model, TrainConfig(lr_scale={"lora_(": 2}))
    with pytest.raises(ValueError, match=r"multiplier must be > 0"):
        param_groups(model, TrainConfig(lr_scale={"lora_A": 0}))
