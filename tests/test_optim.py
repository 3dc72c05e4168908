"""Optimiser parameter groups: DeiT-style recipes train norms, biases and embeddings without weight decay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rdprune.config.schema import FinetuneConfig
from rdprune.training.optim import make_optimizer, parameter_groups

timm = pytest.importorskip("timm")


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1,
                             embed_dim=32, depth=1, num_heads=2)


def exempt_names(model: nn.Module, skip: list[str]) -> set[str]:
    groups = parameter_groups(model, 0.05, skip)
    free = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in free}


def test_each_kind_exempts_exactly_its_parameters():
    model = tiny_vit()
    names = {n for n, _ in model.named_parameters()}
    assert exempt_names(model, []) == set()
    assert exempt_names(model, ["bias"]) == {n for n in names if n.endswith(".bias")}
    assert exempt_names(model, ["norm"]) == {n for n in names if ".norm" in n or n.startswith("norm.")}
    assert exempt_names(model, ["embedding"]) == {"pos_embed", "cls_token"}
    every = exempt_names(model, ["norm", "bias", "embedding"])
    decayed = names - every
    assert decayed and all(n.endswith(".weight") and model.get_submodule(n.rsplit(".", 1)[0]).__class__ in (nn.Linear, nn.Conv2d)
                           for n in decayed)


def test_hugging_face_embeddings_are_found_by_name():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    assert exempt_names(model, ["embedding"]) == {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    assert "vit.layernorm.weight" in exempt_names(model, ["norm"])


def test_exempt_parameters_do_not_decay():
    """One AdamW step with zero gradients: decayed weights shrink by lr * weight_decay, exempt ones stay."""
    model = tiny_vit()
    section = FinetuneConfig(optimizer="adamw", lr=0.1, weight_decay=0.5, weight_decay_skip=["norm", "bias", "embedding"])
    optimizer = make_optimizer(model, section)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    free = exempt_names(model, section.weight_decay_skip)
    for name, param in model.named_parameters():
        expected = before[name] if name in free else before[name] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(param.detach(), expected, msg=name)


def test_a_shared_parameter_is_stepped_once():
    """Tied weights (one parameter in two modules) appear in one group once, as model.parameters() lists them."""
    first = nn.Linear(4, 4, bias=False)
    second = nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    for skip in ([], ["bias"]):
        groups = parameter_groups(model, 0.0, skip)
        assert sum(len(g["params"]) for g in groups) == 1
    optimizer = make_optimizer(model, FinetuneConfig(lr=1.0, momentum=0.0, weight_decay=0.0))
    before = first.weight.detach().clone()
    first.weight.grad = torch.ones_like(first.weight)
    optimizer.step()
    torch.testing.assert_close(first.weight.detach(), before - 1.0)
