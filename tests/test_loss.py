"""The response-only loss equals transformers' own causal-LM loss, with and without `logits_to_keep`."""

import pytest
import torch
from conftest import make_model

from ila.training.loss import response_loss


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 64, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, :9] = -100  # rows whose responses start at different positions
    labels[2, 11:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen2"])
def test_equals_the_models_own_loss(arch):
    model = make_model(arch)
    b = batch()
    with torch.no_grad():
        ours = response_loss(model, b)
        theirs = model(**b).loss
    torch.testing.assert_close(ours, theirs)


def test_logits_only_where_needed_changes_nothing():
    model = make_model("llama")
    b = batch()
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                     ignore_index=-100)
        torch.testing.assert_close(response_loss(model, b), expected)
