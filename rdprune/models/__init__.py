"""Model definitions rdprune ships (CIFAR ResNets) and the registry that builds models by name."""
