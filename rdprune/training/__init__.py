"""Training: the engine protocol and its engines (local/DDP, DeepSpeed), optimisers and schedules,
mid-fine-tuning checkpoints, and evaluation. DeepSpeed is imported only when its engine is built."""
