"""ila in a user's own script: `prepare_strategy` (a strategy's model + callbacks for any Trainer) and
`rank_update` (an update-based importance method on a user's trained PEFT adapter)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import ila
from ila.adapters import load_lora_adapter
from ila.data import collate, load_data
from ila.errors import IlaError
from ila.layers import discover_layers

SETTINGS = {"max_length": 32, "max_examples": 48}


def test_rank_update_equals_identify_on_the_same_adapter(model_dirs, data_file, tmp_path):
    """ILA stage 2 through `rank_update` on a loaded adapter learns the scores `ila identify --adapter` learns."""
    model_dir = str(model_dirs("llama"))
    ila.identify(tmp_path / "stage1", model=model_dir, data=str(data_file), max_steps=4, stage2_steps=2,
                 **SETTINGS)
    adapter = tmp_path / "stage1" / "adapter"
    expected = ila.identify(tmp_path / "given", model=model_dir, data=str(data_file), adapter=str(adapter),
                            stage2_steps=3, **SETTINGS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, heldout = load_data(str(data_file), tokenizer, **SETTINGS)
    peft_model = load_lora_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)  # as a user's trained adapter is left: LoRA trainable
    peft_model.train()
    ranking = ila.rank_update(peft_model, train, heldout=heldout, collator=collate(tokenizer), stage2_steps=3)
    assert [x.name for x in ranking.layers] == [x.name for x in expected.layers]
    assert [e.score for e in ranking.entries] == pytest.approx([e.score for e in expected.entries], abs=1e-5)
    assert ranking.metadata["stage2_steps"] == 3 and ranking.method == "ila"
    assert not any(n.endswith("ila_gates.scores") for n, _ in peft_model.named_parameters())  # left as it was
    assert peft_model.training and all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    with pytest.raises(IlaError, match="carries no LoRA adapter"):
        ila.rank_update(AutoModelForCausalLM.from_pretrained(model_dir), train, collator=collate(tokenizer))
    with pytest.raises(IlaError, match="does not score a finished update"):
        ila.rank_update(peft_model, train, method="grad-norm", collator=collate(tokenizer))


def test_prepare_strategy_in_a_plain_trainer(model_dirs, data_file, tmp_path):
    """Mid-Block through `prepare_strategy`: LoRA on the segment's blocks only, and a plain HF Trainer trains it;
    selection with a ranking adapts exactly the ranking's top layers."""
    model_dir = str(model_dirs("llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, _ = load_data(str(data_file), tokenizer, **SETTINGS)
    plan = ila.prepare_strategy("midblock", AutoModelForCausalLM.from_pretrained(model_dir), segments="01")
    adapted = {n for n, m in plan.model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted and all(".layers.1." in n for n in adapted)
    before = {n: p.detach().clone() for n, p in plan.model.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, save_strategy="no", remove_unused_columns=False, learning_rate=1e-2)
    Trainer(model=plan.model, args=args, train_dataset=train, data_collator=collate(tokenizer),
            callbacks=plan.callbacks).train()
    assert any(not torch.equal(before[n], p) for n, p in plan.model.named_parameters() if n in before)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layers = discover_layers(model)
    ranking = ila.Ranking.from_scores(layers, [float(i % 5) for i in range(len(layers))], {"method": "test"})
    plan = ila.prepare_strategy("selection", model, select="top:0.5", rankings=[ranking])
    assert {x.name for x in plan.selection.trained} == {x.name for x in ranking.top(0.5)}
    with pytest.raises(IlaError, match="strategy lisa: unknown option 'segments'"):
        ila.prepare_strategy("lisa", model, segments="01")
    with pytest.raises(IlaError, match="reads a ranking"):
        ila.prepare_strategy("lisa", model, lisa_sampling="ranking")


def test_ist_callbacks_in_a_plain_trainer(model_dirs, data_file, tmp_path):
    """IST through `prepare_strategy` in a plain HF Trainer: importance rounds on the given data move the block
    scores, and only N_u blocks' LoRA weights change per step; without data it is refused."""
    model_dir = str(model_dirs("llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, _ = load_data(str(data_file), tokenizer, **SETTINGS)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(IlaError, match="strategy ist: evaluates on data"):
        ila.prepare_strategy("ist", model)
    plan = ila.prepare_strategy("ist", model, ist_interval=2, ist_update_fraction=0.5, train=train,
                                collator=collate(tokenizer))
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, save_strategy="no", remove_unused_columns=False, learning_rate=1e-2)
    Trainer(model=plan.model, args=args, train_dataset=train, data_collator=collate(tokenizer),
            callbacks=plan.callbacks).train()
    record = plan.record()
    assert record["rounds"] == 1 and any(s != 0 for s in record["scores"])
    assert sum(record["updated_steps"]) == 4 * record["update_blocks"] == 4  # one of 2 blocks per step
