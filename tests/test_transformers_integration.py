"""lossops.integrations.transformers against the unpatched transformers models it patches.

Tiny models built from configs (nothing downloaded); the oracle is always the same model unpatched.
"""
import copy
import functools
import os
import sys

import pytest
import torch
import transformers
from torch import nn

import lossops.integrations.transformers as lossops_hf
from lossops.integrations.transformers import UnsupportedModelError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _common import TensorMemoryPeak  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 384
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# What each family needs to be tiny, and its logit transform set where it changes the loss (the lm_head weight is
# scaled up in `models` so that it does).
FAMILY_CONFIG = {
    "gemma2": dict(final_logit_softcapping=2.0), "gemma3_text": dict(final_logit_softcapping=2.0),
    "granite": dict(logits_scaling=4.0), "cohere": dict(logit_scale=0.5), "cohere2": dict(logit_scale=0.5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, output_router_logits=True),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True),
}
LOGITS_SCALE = 30.0


def tiny_config(model_type: str, **overrides):
    return transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILY_CONFIG.get(model_type, {}), **overrides})


def models(model_type: str, **overrides):
    """(unpatched, patched): the same weights, the second patched."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(LOGITS_SCALE)
    patched = copy.deepcopy(reference)
    lossops_hf.patch(patched)
    return reference, patched


def batch(batch_size=2, seq=16, masked=True, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq), generator=generator)
    labels = input_ids.clone()
    if masked:  # a prompt that is not trained on, and padding at the end of the last row
        labels[:, :4] = -100
        labels[-1, -3:] = -100
    return input_ids, labels


def assert_same_gradients(reference, patched, tolerance=1e-5):
    """Each gradient within `tolerance` of its largest entry: an embedding's rows are sums over tokens, and
    summation order alone moves its small entries by more than a fixed relative tolerance."""
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=tolerance * scale,
                                       msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("masked", [False, True], ids=["all-labels", "some-ignored"])
@pytest.mark.parametrize("num_items", [None, 23], ids=["mean", "num-items"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_loss_and_gradients_equal_transformers(model_type, masked, num_items):
    reference, patched = models(model_type)
    input_ids, labels = batch(masked=masked)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected = reference(input_ids, labels=labels, **kwargs)
    got = patched(input_ids, labels=labels, **kwargs)
    assert type(got) is type(expected) and got.logits is None and got.past_key_values is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    assert_same_gradients(reference, patched)


@pytest.mark.parametrize("model_type", [t for t in lossops_hf.SUPPORTED_MODEL_TYPES if t not in ("llama", "qwen2")])
def test_every_supported_family_equals_transformers(model_type):
    # Softcap (Gemma 2/3), logits_scaling (Granite), logit_scale (Cohere), router aux loss (MoE): all bite here.
    reference, patched = models(model_type)
    input_ids, labels = batch()
    expected = reference(input_ids, labels=labels, num_items_in_batch=torch.tensor(17))
    got = patched(input_ids, labels=labels, num_items_in_batch=torch.tensor(17))
    assert type(got) is type(expected) and got.logits is None
    if "moe" in model_type or model_type == "mixtral":
        assert got.aux_loss is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-6, atol=2e-6)
    expected.loss.backward()
    got.loss.backward()
    assert_same_gradients(reference, patched)


def test_the_logit_transform_is_what_makes_softcapped_losses_equal():
    reference, patched = models("gemma2")
    input_ids, labels = batch()
    hidden = reference.model(input_ids).last_hidden_state
    uncapped = lossops_hf.causal_lm_loss(hidden, reference.lm_head.weight, labels)
    expected = reference(input_ids, labels=labels).loss
    assert abs(uncapped.item() - expected.item()) > 1.0
    torch.testing.assert_close(patched(input_ids, labels=labels).loss, expected)


def test_loss_keywords_pass_through():
    reference, patched = models("llama")
    input_ids, labels = batch()
    shifted = torch.roll(labels, -2, dims=1)
    sevens = labels.masked_fill(labels == -100, 7)
    for labels_, kwargs in [(labels, dict(shift_labels=shifted)), (sevens, dict(ignore_index=7)),
                            (labels, dict(num_items_in_batch=19))]:
        torch.testing.assert_close(patched(input_ids, labels=labels_, **kwargs).loss,
                                   reference(input_ids, labels=labels_, **kwargs).loss, msg=str(kwargs))
    # logits_to_keep keeps the last positions; shift_labels of those positions is how the loss is then asked for.
    kept = dict(logits_to_keep=5, shift_labels=shifted[:, -5:].contiguous())  # transformers views it
    torch.testing.assert_close(patched(input_ids, labels=labels, **kept).loss,
                               reference(input_ids, labels=labels, **kept).loss)
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(input_ids, labels=labels, logits_to_keep=5)


def test_tuple_outputs_put_the_loss_first():
    reference, patched = models("qwen2")
    input_ids, labels = batch()
    expected = reference(input_ids, labels=labels, return_dict=False)
    got = patched(input_ids, labels=labels, return_dict=False)
    torch.testing.assert_close(got[0], expected[0])
    assert len(got) == len(expected) - 1  # no logits


def test_bfloat16_model_gets_a_float32_loss_as_in_transformers():
    reference, patched = (model.to(torch.bfloat16) for model in models("llama"))
    input_ids, labels = batch()
    expected = reference(input_ids, labels=labels).loss
    got = patched(input_ids, labels=labels).loss
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_twenty_adamw_steps_give_the_same_losses(model_type):
    reference, patched = models(model_type)
    data = [batch(seed=step) for step in range(20)]
    losses = {}
    for name, model in [("reference", reference), ("patched", patched)]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for input_ids, labels in data:
            loss = model(input_ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["reference"][-1] < losses["reference"][0]
    torch.testing.assert_close(losses["patched"], losses["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_peak_memory_is_lower_by_more_than_the_logits(model_type):
    reference, patched = models(model_type, vocab_size=1000)
    input_ids, labels = batch(seq=64)
    logits_bytes = input_ids.numel() * 1000 * 4
    peaks = {}
    for name, model in [("reference", reference), ("patched", patched)]:
        with TensorMemoryPeak() as memory:
            model(input_ids, labels=labels).loss.backward()
        peaks[name] = memory.peak
    assert peaks["patched"] + logits_bytes < peaks["reference"], (peaks, logits_bytes)


def test_unpatch_restores_the_original_forward():
    reference, model = models("llama")
    input_ids, labels = batch()
    assert lossops_hf.is_patched(model) and model(input_ids, labels=labels).logits is None
    lossops_hf.unpatch(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is type(model).forward
    assert "forward" not in model.lm_head.__dict__  # the head's interceptor goes with the patch
    assert not lossops_hf.is_patched(model)
    torch.testing.assert_close(model(input_ids, labels=labels).logits, reference(input_ids).logits)
    with pytest.raises(RuntimeError, match="not patched"):
        lossops_hf.unpatch(model)

    with lossops_hf.patch(model) as same:
        assert same is model and model(input_ids, labels=labels).logits is None
        with pytest.raises(RuntimeError, match="patched already"):
            lossops_hf.patch(model)
    assert "forward" not in model.__dict__


def test_a_wrapper_set_before_patching_is_called_and_restored():
    _, model = models("llama")
    lossops_hf.unpatch(model)
    calls = []

    @functools.wraps(model.forward)  # as accelerate's wrappers do, so the signature is still the model's
    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("labels") is None)
        return type(model).forward(model, *args, **kwargs)

    model.forward = wrapper
    input_ids, labels = batch()
    with lossops_hf.patch(model):
        assert model(input_ids, labels=labels).logits is None
    assert calls == [True] and model.forward is wrapper


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    _, model = models("llama")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.zero_()  # uniform logits: the loss is log(V)
    input_ids, labels = batch()
    assert clone.forward.__self__ is clone and lossops_hf.is_patched(clone)
    assert clone.lm_head.forward.__self__ is clone.lm_head
    torch.testing.assert_close(clone(input_ids, labels=labels).loss, torch.tensor(VOCAB, dtype=torch.float).log())
    assert model(input_ids, labels=labels).loss.item() != pytest.approx(float(torch.tensor(VOCAB).log()))


def test_a_head_replaced_after_patching_is_intercepted_too():
    # resize_token_embeddings makes a new lm_head: the next fused forward gives it the interceptor.
    reference, patched = models("llama")
    for model in (reference, patched):
        model.resize_token_embeddings(VOCAB + 8)
    assert "forward" not in patched.lm_head.__dict__
    input_ids, labels = batch()
    got = patched(input_ids, labels=labels)
    assert got.logits is None and "forward" in patched.lm_head.__dict__
    torch.testing.assert_close(got.loss, reference(input_ids, labels=labels).loss)
    lossops_hf.unpatch(patched)
    assert "forward" not in patched.lm_head.__dict__


def test_without_labels_the_patched_model_is_the_original():
    reference, patched = models("qwen2")
    input_ids, _ = batch()
    assert torch.equal(patched(input_ids).logits, reference(input_ids).logits)
    assert torch.equal(patched(input_ids, logits_to_keep=1).logits, reference(input_ids, logits_to_keep=1).logits)
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(input_ids, generation_config=config),
                       reference.generate(input_ids, generation_config=config))


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows=16, seq=16):
        self.items = []
        for row in range(rows):
            input_ids, labels = batch(batch_size=1, seq=seq, seed=100 + row)
            labels[0, :row % 5] = -100  # the rows keep different numbers of tokens
            self.items.append({"input_ids": input_ids[0], "labels": labels[0]})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_trainer_with_gradient_accumulation_logs_the_same_losses(tmp_path):
    reference, patched = models("llama")
    history = {}
    for name, model in [("reference", reference), ("patched", patched)]:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
        # num_items_in_batch reaches the model only when its forward shows **kwargs: the patch keeps it.
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        history[name] = [(log["loss"], log["grad_norm"]) for log in trainer.state.log_history if "loss" in log]
    assert len(history["reference"]) == 3
    torch.testing.assert_close(history["patched"], history["reference"], rtol=1e-4, atol=1e-5)


def test_what_cannot_be_patched_raises_naming_its_class():
    with pytest.raises(UnsupportedModelError, match="got Linear"):
        lossops_hf.patch(nn.Linear(4, 4))
    config = tiny_config("llama")
    with pytest.raises(UnsupportedModelError, match="LlamaForSequenceClassification is not a causal"):
        lossops_hf.patch(transformers.LlamaForSequenceClassification(config))
    with pytest.raises(UnsupportedModelError, match="LlamaModel is not a causal"):
        lossops_hf.patch(transformers.LlamaModel(config))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel \(model_type='gpt2'\) is not among.*llama"):
        lossops_hf.patch(gpt2)

    model = transformers.LlamaForCausalLM(config)
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM computes its loss with '<lambda>'"):
        lossops_hf.patch(model)
    model = transformers.LlamaForCausalLM(config)
    model.lm_head.register_forward_hook(lambda *args: None)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM's output layer has hooks"):
        lossops_hf.patch(model)
    model = transformers.LlamaForCausalLM(config)
    model.lm_head = nn.Sequential(nn.Linear(64, VOCAB))
    with pytest.raises(UnsupportedModelError, match="output layer is a Sequential, not a plain torch.nn.Linear"):
        lossops_hf.patch(model)
    assert not lossops_hf.is_patched(model)
    with pytest.raises(ValueError, match="chunk_size"):
        lossops_hf.patch(transformers.LlamaForCausalLM(config), chunk_size=0)
