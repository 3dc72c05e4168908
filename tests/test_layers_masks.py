import pytest
import torch
import torchvision

from rdprune.core.layers import describe_layers, layer_flops, prunable_layers
from rdprune.core.masks import (
    MaskGuard,
    apply_masks,
    flops_remaining,
    layer_sparsity,
    load_masks,
    magnitude_mask,
    pruned_count,
    pruned_state_dict,
    save_masks,
    total_sparsity,
)

from tiny_models import Branchy, NoPrunable


def test_finds_layers_by_name_in_declaration_order_and_skips():
    model = Branchy()
    assert list(prunable_layers(model)) == ["head", "right", "stem", "left", "depthwise"]
    assert "stem" not in prunable_layers(model, skip=["stem"])


def test_flops_follow_execution_not_declaration():
    model = Branchy()
    flops = layer_flops(model, prunable_layers(model), (3, 8, 8))
    # conv FLOPs = 2 * weights * output positions; linear = 2 * weights
    assert flops["stem"] == 2 * 8 * 3 * 9 * 64
    assert flops["right"] == 2 * (8 * 4 * 9) * 64  # grouped: weight holds in/groups channels
    assert flops["depthwise"] == 2 * 16 * 9 * 64
    assert flops["head"] == 2 * 24 * 5


@pytest.mark.parametrize("name,count", [("resnet50", 54), ("mobilenet_v2", 53), ("densenet121", 121), ("vgg16_bn", 16),
                                        ("efficientnet_b0", 82)])
def test_torchvision_models(name, count):
    infos = describe_layers(torchvision.models.get_model(name), (3, 64, 64))
    assert len(infos) == count
    assert all(i.flops > 0 and i.flops % (2 * i.size) == 0 for i in infos)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="has no prunable layer"):
        prunable_layers(NoPrunable())
    with pytest.raises(ValueError, match=r"layers to skip not found among prunable layers: \['nope'\]"):
        prunable_layers(Branchy(), skip=["nope"])
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\], got 1.5"):
        pruned_count(1.5, 10)
    with pytest.raises(ValueError, match=r"amount of layer 'stem' must be a fraction in \[0, 1\], got -0.1"):
        apply_masks(Branchy(), {"stem": -0.1})
    with pytest.raises(ValueError, match="amounts given for unknown layers"):
        apply_masks(Branchy(), {"nope": 0.1})


def test_magnitude_mask_prunes_smallest_and_counts_zeros():
    w = torch.tensor([0.0, -3.0, 0.5, 2.0, -0.1, 0.0])
    keep = magnitude_mask(w, 3)
    assert keep.tolist() == [False, True, True, True, False, False]
    assert pruned_count(0.5, 6) == 3 and pruned_count(0.29, 100) == 29


def test_apply_masks_amounts_and_sparsity():
    torch.manual_seed(0)
    model = Branchy()
    layers = prunable_layers(model)
    masks = apply_masks(model, {"stem": 0.5, "head": 0.25})
    sp = layer_sparsity(layers)
    assert sp["stem"] == pytest.approx(round(0.5 * 216) / 216)
    assert sp["head"] == pytest.approx(30 / 120)
    assert sp["left"] == 0.0
    assert int((~masks["stem"]).sum()) == 108
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    assert total_sparsity(sizes, sp) == pytest.approx((108 + 30) / sum(sizes.values()))
    assert total_sparsity(sizes, sp, dense=100) == pytest.approx((108 + 30) / (sum(sizes.values()) + 100))
    flops = {"stem": 10, "head": 30}
    assert flops_remaining(flops, {"stem": 0.5, "head": 0.0}) == pytest.approx(35 / 40)
    # a mask never revives zeros: pruning less than the current sparsity keeps them
    masks2 = apply_masks(model, {"stem": 0.1})
    assert int((~masks2["stem"]).sum()) == 108


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_zeros_stay_zero_through_optimizer_steps(opt):
    torch.manual_seed(0)
    model = Branchy()
    layers = prunable_layers(model)
    masks = apply_masks(model, {n: 0.6 for n in layers})
    optimizer = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    }[opt](model.parameters())
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    with MaskGuard(layers, masks, optimizer):
        for _ in range(5):
            loss = model(torch.randn(4, 3, 8, 8)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for n, m in layers.items():
        assert torch.all(m.weight[~masks[n]] == 0)
        assert not torch.equal(m.weight, before[n])  # surviving weights did train


def test_masks_round_trip_and_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    masks = apply_masks(model, {"stem": 0.7, "left": 0.3})
    save_masks(masks, tmp_path / "masks.pt")
    loaded = load_masks(tmp_path / "masks.pt")
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    plain = Branchy()
    plain.load_state_dict(pruned_state_dict(model, masks))  # strict: same keys as the unmodified model
    assert int((plain.stem.weight == 0).sum()) == round(0.7 * 216)
    assert not list(tmp_path.glob(".*tmp"))
    torch.save(torch.tensor([1.0]), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not hold masks"):
        load_masks(tmp_path / "bad.pt")
