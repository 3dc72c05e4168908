"""``rdprune.load_model(run_dir)``: the pruned model of a finished run, ready to evaluate.

The run directory holds everything needed: its resolved ``config.yaml`` names the model (name,
class count, kwargs) and the data whose input shape sizes it, ``final/model.pt`` the pruned
weights (zeros where pruned) that load into the unmodified architecture at every granularity, and,
for channel runs, ``final/smaller/model.pt2`` the physically smaller model (torch.export).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rdprune.config import load_config
from rdprune.data import build_data
from rdprune.models.registry import build_model, model_preprocessing
from rdprune.pipeline.run_dir import RunLayout


def load_model(run_dir: str | os.PathLike, *, smaller: bool = False) -> nn.Module:
    """The final model of the finished run in ``run_dir`` (its ``run.out_dir``), on the CPU, in eval mode.

    By default the masked full model: the run's own architecture (``model.name``, ``model.num_classes``
    or the dataset's, ``model.kwargs``, the data's input shape) with ``final/model.pt`` loaded
    (``weights_only=True``); pruned weights are zero. This works at every granularity.
    ``smaller=True`` (channel granularity only) returns the physically smaller model instead,
    ``torch.export.load(final/smaller/model.pt2).module()``: it computes what the masked model
    computes, with the removed channels gone. Its graph was traced in eval mode (BatchNorm uses
    its running statistics, dropout is off); torch does not support ``.eval()``/``.train()`` on it.

    The data is built to read its input shape and class count, as the run did (cheap for the
    bundled mnist5k; a dataset folder must still be where the config says). Raises ValueError for
    a folder that holds no finished run, or ``smaller=True`` where there is no smaller model.
    """
    out = RunLayout(Path(run_dir))
    if not out.final_model.is_file():
        raise ValueError(
            f"{out.root} holds no finished run: {out.final_model} does not exist; pass the run.out_dir of a run "
            "that has finished (python -m rdprune.run CONFIG writes final/model.pt at its end; rerun the same "
            "command to finish an interrupted run)"
        )
    if not out.config.is_file():
        raise ValueError(f"{out.root} has final/model.pt but no config.yaml, which names the model; "
                         "pass the run.out_dir of a run written by rdprune")
    cfg = load_config(out.config)
    if smaller:
        return _smaller(out, cfg.prune.granularity)
    data = build_data(cfg.data.name, cfg.data.root, seed=cfg.run.seed,
                      preprocessing=model_preprocessing(cfg.model.name, cfg.model.kwargs, weights=cfg.model.weights))
    # checkpoint takes precedence over weights, which are then not downloaded or loaded: the final state_dict is all
    model = build_model(
        cfg.model.name, cfg.model.num_classes or data.num_classes, checkpoint=os.fspath(out.final_model),
        weights=cfg.model.weights, input_shape=data.input_shape, kwargs=cfg.model.kwargs,
        drop_path_rate=cfg.model.drop_path_rate,
    )
    return model.eval()


def _smaller(out: RunLayout, granularity: str) -> nn.Module:
    """The physically smaller model the run exported (channel granularity does)."""
    path = out.smaller_model
    if not path.is_file():
        raise ValueError(f"{path} does not exist: this prune.granularity {granularity!r} run exported no physically smaller "
                         "model (a channel run does, unless its log says why not); load the masked model with smaller=False")
    return torch.export.load(os.fspath(path)).module()
