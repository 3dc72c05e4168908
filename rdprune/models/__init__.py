"""Model definitions rdprune ships (CIFAR ResNets), the registry that builds models by name, and timm:/hf: models."""
