"""Small timm ViTs for 1x28x28 digits, given to the pipeline as ``model.name=dist_scripts.vit_models:<factory>``.

In both, the attention and MLP layers of the two blocks are 2:4 candidates; the patch embedding (a
Conv2d) and the 10-class head are not.
"""
import timm
from torch import nn


def tiny_vit(num_classes: int, in_channels: int = 1) -> nn.Module:
    """Linear layers 64, 128, 192 and 256 wide: quick on a CPU."""
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=28, patch_size=7, in_chans=in_channels,
                             embed_dim=64, depth=2, num_heads=4)


def small_vit(num_classes: int, in_channels: int = 1) -> nn.Module:
    """Two DeiT-S-wide blocks (384, MLP 1536) on 28x28 digits: layers large enough for 2:4 kernels to pay off on a GPU."""
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=28, patch_size=7, in_chans=in_channels,
                             embed_dim=384, depth=2, num_heads=6)


def tiny_vit_with_unused_layer(num_classes: int, in_channels: int = 1) -> nn.Module:
    """``tiny_vit`` with a 2:4-shaped Linear layer its forward never calls (as an auxiliary head left behind)."""
    model = tiny_vit(num_classes, in_channels)
    model.unused = nn.Linear(64, 64)
    return model
