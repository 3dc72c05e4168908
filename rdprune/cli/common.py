"""Command-line plumbing shared by rdprune's entry points: argument parsing and the error contract.

The contract users rely on (the README's "Errors"): exit 0 on success; a user error prints ``rdprune: error: <message>`` as
one line on stderr and exits 2 without a traceback (``RDPRUNE_DEBUG=1`` shows it). SIGTERM or SIGINT (Ctrl-C) stops
the run at its next safe point (:mod:`rdprune.stop`), keeping what a rerun resumes from: one line
``rdprune: stopped by SIGTERM ...`` and exit 143 (SIGTERM) or 130 (SIGINT); a second Ctrl-C stops at once (exit 130).

This module imports no torch, and the entry points import it only after the config is loaded: a bad
file, key, type or value is refused in well under a second. Torch (and the ranks' coordination) is
loaded for an error only where it already is, or where torchrun or srun started several processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import rdprune
from rdprune import distributed, stop
from rdprune.config import SECTIONS, Config
from rdprune.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_PACKAGE_DIR = Path(rdprune.__file__).resolve().parent


def _raised_by_rdprune(err: BaseException) -> bool:
    """Whether the innermost frame of the traceback is rdprune's own code.

    The pruning core reports bad arguments with deliberate ValueErrors; a ValueError from deep
    inside torch or numpy is a bug whose traceback the user should see.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _user_error_exits(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """``main`` with user errors turned into one line on stderr and exit code 2.

    Under torchrun every rank usually fails alike (the same config on every rank): the line is
    shown once, by the rank that reports it first; a rank whose error differs shows its own. The
    exit is a ``SystemExit``, so torchrun's error file holds no traceback for a user error.
    """

    @functools.wraps(main)
    def checked(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except ValueError as err:  # UserError is a ValueError
            if _debug() or not (isinstance(err, UserError) or _raised_by_rdprune(err)):
                raise
            if _shows(err):
                sys.stderr.write(f"rdprune: error: {_one_line(err)}\n")
                sys.stderr.flush()
            raise SystemExit(EXIT_USER_ERROR) from None

    return checked


_LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"), ("TORCHELASTIC_ERROR_FILE",))
"""Variables of which all of one group say that torchrun or srun started this process (see
:func:`rdprune.distributed.collectives._launch_env`), or that torchrun wants its error file."""


def _launched() -> bool:
    """Whether a launcher started this process, so that its failures are coordinated with other ranks."""
    return any(all(v in os.environ for v in group) for group in _LAUNCHER_VARIABLES)


def _coordinated() -> bool:
    """Whether failures go through :mod:`rdprune.distributed`: under a launcher, or once the collectives
    (and torch) are loaded anyway. A lone process that failed before that has no rank to tell."""
    return _launched() or "rdprune.distributed.collectives" in sys.modules


def _shows(err: BaseException) -> bool:
    """Whether this process prints ``err``: always when alone, the first rank to report it otherwise."""
    return distributed.first_to_report(err) if _coordinated() else True


def _debug() -> bool:
    return os.environ.get("RDPRUNE_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> NoReturn:
    """Call ``main(argv)`` (default: ``sys.argv[1:]``) and exit with its return code.

    User errors become one line on stderr and exit code 2; other errors keep their traceback and
    reach torchrun's error file (:func:`rdprune.distributed.record`). SIGTERM and SIGINT stop the run at its
    next safe point: one line, exit 143 or 130; a second Ctrl-C stops at once (exit 130).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    checked = _user_error_exits(main)
    # torchrun's error file and the note to the other ranks concern launched processes only (a lone
    # process has no peer, and no error file is asked for); alone, no torch is loaded for them.
    entry = distributed.record(checked) if _launched() else checked
    try:
        with stop.handling_signals():
            code = entry(args)
    except stop.Stopped as stopped:
        if _debug():
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops alike: rank 0 says so
            sys.stderr.write(f"rdprune: stopped by {signal.Signals(stopped.signum).name} ({stopped.what}); "
                             "rerun the same command to resume\n")
            sys.stderr.flush()
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:
        if _debug():
            raise
        sys.stderr.write("rdprune: interrupted\n")
        sys.stderr.flush()
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if code is None else int(code))


def check_gpu_decoding(cfg: Config) -> None:
    """Refuse, before any work, GPU decoding without a GPU: with run.device 'cuda', data.backend 'dali'
    decodes on the GPU (DALI's 'mixed' decoders); the generic device error would not say why DALI matters.

    One of the checks that need torch, so it runs after the config is loaded; the others are the
    class count against the data, the model's layers and the reachability of a pruning target
    (``rdprune.pipeline.loop.check_run``), and a latency budget, which is known only once timed."""
    import torch

    from rdprune.pipeline.feeding import uses_dali

    if cfg.run.device == "cuda" and uses_dali(cfg) and not torch.cuda.is_available():
        raise UserError("data.backend 'dali' with run.device 'cuda' decodes images on the GPU (DALI 'mixed'), but CUDA is "
                        "not available here (torch.cuda.is_available() is False); use run.device 'cpu' (DALI then "
                        "decodes on the CPU) or data.backend 'torchvision'")


def deterministic_on_cpu(device: object) -> None:
    """On a CPU, ask torch for deterministic kernels (warning, not failing, where an op has none): with
    the seed and a fixed thread count, two runs on one machine then give identical results. Where
    torch's kernels dispatch to another instruction set (ATEN_CPU_CAPABILITY, oneDNN's and MKL's own
    dispatch) they round differently; pinning that is the user's choice (docs/quickstart.md). CUDA
    runs are left as they are: deterministic GPU kernels cost speed and need CUBLAS_WORKSPACE_CONFIG."""
    import torch

    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def _sections_help() -> str:
    lines = ["config sections and their keys (override any as section.key=value):"]
    for name, cls in SECTIONS.items():
        lines.append(f"  {name}: {', '.join(f.name for f in dataclasses.fields(cls))}")
    lines += [
        "",
        "override values are YAML: prune.method=lamp finetune.steps=100 prune.skip=[conv1,fc]",
        "run.resume=false model.checkpoint=null. The README's config reference explains each key.",
        "Set RDPRUNE_DEBUG=1 to see the traceback of an error.",
    ]
    return "\n".join(lines)


def build_run_parser(prog: str = "python -m rdprune.run") -> argparse.ArgumentParser:
    """The parser of ``CONFIG [section.key=value ...]``; misuse prints the usage line and exits 2."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prune a network layer-adaptively by rate-distortion optimisation, then fine-tune, "
                    "as the YAML config says. The same command runs under torchrun.",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="YAML config file, e.g. configs/quickstart.yaml")
    # default=[]: without a default argparse counts a "*" positional as required and names it in its error
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help="dotted overrides applied after the file, in order (optional)")
    parser.add_argument("--version", action="version", version=f"rdprune {rdprune.__version__}")
    return parser


def parse_run_args(argv: Sequence[str], prog: str = "python -m rdprune.run") -> tuple[Path, list[str]]:
    """``argv`` (without the program name) -> (config path, overrides)."""
    ns = build_run_parser(prog).parse_args(list(argv))
    return ns.config, list(ns.overrides)
