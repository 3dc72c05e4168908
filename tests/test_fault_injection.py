"""Fault injection: a crash at every write of a run, ENOSPC at every write, every run file damaged in
turn, and SIGTERM / kill -9 under torchrun. Each fault is followed by a rerun of the same command,
which must either end with the uninterrupted run's result (rows without timings, final weights,
masks, allocation files) or stop with one line (exit 2, no traceback). Never a silently different
result, never a traceback.

The in-process faults patch :func:`rdprune.files._atomic_write`, through which every file of a run
goes; DeepSpeed's own checkpoint files, written by its checkpoint engine on every rank, are counted and
injected under torchrun (``tests/dist_scripts/deepspeed_writes.py``). A first, uninterrupted
run records the sequence of writes; the fault at write k is injected before write k, for every k.
Each test counts its outcomes (faults injected / resumed identical / refused with one line) in
``OUTCOMES``, printed at the end of the session (``-s`` shows it).

Counts at the time of writing (faults injected / resumed identical / refused with one line), on a
2-core machine shared with other jobs:

* crash before each of the 22 kinds of write (the run's 30 writes, of each folder's 5 curve pieces only the first):
  22 / 21 / 1 (the one: killed between ``last.pt`` and its row)
* ENOSPC at each of the 22 kinds of write: 22 one-line refusals; the rerun after 7 of them: 7 / 6 / 1
* every file of a run stopped mid fine-tuning, 4 kinds of damage: 48 / 39 / 9
* every file of a finished run, 3 kinds: 51 / 39 / 12
* the fast share of the damage (the files a resume reads): 24 / 15 / 9
* torchrun, 2 ranks: SIGTERM at 5 points 5 / 5 / 0 (each stopped in under 20 s), kill -9 at 3 points 3 / 3 / 0
* torchrun, 2 ranks, DeepSpeed ZeRO-2: a rank killed before each write of a DeepSpeed checkpoint (rank 0's model
  states and optimizer shard, rank 1's shard, the marker naming them) 4 / 4 / 0

No silently different result, no traceback. Wall times in a whole `.ci/run` on the 2-core machine: about 10 minutes
for the file-level faults and torchrun signals (crash at every kind of write 1.8 min, ENOSPC 1 min, the damage tests
1.2 and 0.6 min, torchrun SIGTERM 2.3 min and kill -9 1.2 min, the fast tests 2 min), DeepSpeed's writes 2.8 min.
"""
from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import rdprune.files
from rdprune import stop
from rdprune.cli.common import run_cli
from rdprune.run import main

from launch import REPO, SCRIPTS, clean_env, read_rows, torchrun_command

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TINY = ["pretrain.steps=20", "finetune.steps=4", "finetune.checkpoint_every=2", "prune.iterations=2",
        "prune.amount_per_iteration=0.5", "calibration.size=32", "prune.levels=5", "run.progress=false", "run.threads=1"]
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
"""Per test: faults injected, resumed identical, refused with one line."""
REFUSALS: dict[str, str] = {}
"""Damage -> the line it was refused with (printed at the end)."""


class Crash(BaseException):
    """A process killed at a write: nothing in rdprune catches it."""


def argv(out: Path, *extra: str) -> list[str]:
    return [QUICKSTART, *TINY, f"run.out_dir={out}", *extra]


def run_code(out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli(main, argv(out, *extra))
    finally:
        torch.set_num_threads(threads)
    return exc.value.code


class Writes:
    """Counts the writes of :func:`rdprune.files._atomic_write` and injects a fault before the k-th."""

    def __init__(self, monkeypatch, fault_at: int | None = None, fault: str = "crash"):
        self.paths: list[Path] = []
        self.fault_at, self.fault = fault_at, fault
        real = rdprune.files._atomic_write

        def counted(path: Path, write) -> None:
            self.paths.append(Path(path))
            if len(self.paths) == self.fault_at:
                if self.fault == "crash":  # killed mid-write: a half-written temporary file stays behind
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                    os.write(fd, b"half")
                    os.close(fd)
                    raise Crash(str(path))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, write)

        monkeypatch.setattr(rdprune.files, "_atomic_write", counted)


def state(out: Path) -> dict:
    """What a run's result is: rows without timings, final weights and masks, allocation files."""
    return {
        "rows": read_rows(out, timings=False),
        "model": torch.load(out / "final" / "model.pt", weights_only=True),
        "masks": torch.load(out / "final" / "masks.pt", weights_only=True),
        "allocation": {p.name: json.loads(p.read_text()) for p in sorted((out / "allocation").glob("*.json"))},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert a["allocation"] == b["allocation"]
    for key in ("model", "masks"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def one_line(err: str) -> str:
    """The single error line of a refused run (asserting there is exactly one, last, and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("rdprune: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]


def resume_and_judge(out: Path, reference: dict, capsys, counts: collections.Counter, what: str) -> str:
    """Rerun without faults: it finishes with the reference's result, or refuses in one line (then returned)."""
    capsys.readouterr()
    code = run_code(out)
    err = capsys.readouterr().err
    counts["faults injected"] += 1
    if code == 0:
        assert_same(state(out), reference)
        assert not [p for p in out.rglob("*.tmp")], what
        counts["resumed identical"] += 1
        return ""
    assert code == 2, (what, code, err[-3000:])
    counts["refused with one line"] += 1
    return one_line(err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[Path], dict]:
    """The reference run: its directory, the files it wrote in order, its result."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        writes = Writes(mp)
        assert run_code(out) == 0
    return out, writes.paths, state(out)


def crash_points(paths: list[Path]) -> list[int]:
    """A few writes that matter most (fast suite): the first, the pretrained model, the first curve
    piece, a fine-tuning checkpoint, a last.pt, the second row, the final masks."""
    names = [p.name for p in paths]
    picks = [1, names.index("pretrained.pt") + 1, next(i for i, n in enumerate(names, 1) if n.endswith(".curve.pt")),
             names.index("finetune.pt") + 1, len(names) - names[::-1].index("last.pt"),
             len(names) - names[::-1].index("results.jsonl"), names.index("masks.pt") + 1]
    return sorted(set(picks))


def every_kind_of_write(paths: list[Path]) -> list[int]:
    """Every write (1-based), but of a folder's curve pieces, all written alike, only the first stands for the others."""
    folders: set[Path] = set()
    picks = []
    for k, path in enumerate(paths, 1):
        if path.name.endswith(".curve.pt"):
            if path.parent in folders:
                continue
            folders.add(path.parent)
        picks.append(k)
    return picks


def _crash_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k: int, counts) -> str:
    root, paths, reference = uninterrupted
    out = tmp_path / f"crash{k}" / "run"
    with monkeypatch.context() as mp:
        writes = Writes(mp, fault_at=k)
        with pytest.raises(Crash):
            run_code(out)
    assert [p.relative_to(out) for p in writes.paths] == [p.relative_to(root) for p in paths[:k]], \
        f"write {k}: the run wrote in another order than the uninterrupted one"
    refused = resume_and_judge(out, reference, capsys, counts, f"crash before write {k} ({paths[k - 1]})")
    if refused:  # only where the fault leaves a state that cannot be continued exactly
        assert "cannot be rebuilt exactly" in refused, refused
    shutil.rmtree(out.parent)
    return refused


def test_the_writes_injected_are_the_writes_of_a_run(uninterrupted, tmp_path, monkeypatch):
    """Every write goes through the injection point, in the same order in every run."""
    out, paths, _ = uninterrupted
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    removed = {"finetune.pt"}  # written, then removed once its iteration is recorded
    assert sorted({p.relative_to(out) for p in paths if p.name not in removed}) == written
    assert {p.name for p in paths} >= {"config.yaml", "resume_key.json", "provenance.json", "pretrained.pt",
                                       "results.jsonl", "finetune.pt", "last.pt", "curves.npz", "model.pt", "masks.pt"}
    with monkeypatch.context() as mp:
        again = Writes(mp)
        assert run_code(tmp_path / "again") == 0
    assert [p.relative_to(tmp_path / "again") for p in again.paths] == [p.relative_to(out) for p in paths]


def test_crash_at_key_writes_resumes_or_refuses(uninterrupted, tmp_path, monkeypatch, capsys):
    counts = OUTCOMES["crash at key writes"]
    for k in crash_points(uninterrupted[1]):
        _crash_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k, counts)
    assert counts["resumed identical"] + counts["refused with one line"] == counts["faults injected"]


@pytest.mark.slow
def test_crash_at_every_write_resumes_or_refuses(uninterrupted, tmp_path, monkeypatch, capsys):
    counts = OUTCOMES["crash at every write"]
    points = every_kind_of_write(uninterrupted[1])
    for k in points:
        _crash_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k, counts)
    assert counts["faults injected"] == len(points) >= 20


def _full_disk_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k: int, counts, resume: bool = True) -> None:
    root, paths, reference = uninterrupted
    out = tmp_path / f"full{k}" / "run"
    capsys.readouterr()
    with monkeypatch.context() as mp:
        Writes(mp, fault_at=k, fault="enospc")
        assert run_code(out) == 2
    line = one_line(capsys.readouterr().err)
    assert f"cannot write {out / paths[k - 1].relative_to(root)}: No space left on device; free space there" in line, line
    assert not [p for p in out.rglob("*.tmp")]
    if resume:
        resume_and_judge(out, reference, capsys, counts, f"ENOSPC at write {k}")
    else:
        counts["faults injected"] += 1
        counts["refused with one line"] += 1
    shutil.rmtree(out.parent)


def test_full_disk_at_key_writes_is_one_line_then_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    counts = OUTCOMES["ENOSPC at key writes"]
    for k in crash_points(uninterrupted[1]):
        _full_disk_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k, counts)


@pytest.mark.slow
def test_full_disk_at_every_write_is_one_line_then_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    """One line at every write; the rerun after it is the rerun after a crash at that write (above), so only
    the key writes' are run (the fast test)."""
    counts = OUTCOMES["ENOSPC at every write"]
    for k in every_kind_of_write(uninterrupted[1]):
        _full_disk_and_resume(uninterrupted, tmp_path, monkeypatch, capsys, k, counts, resume=False)


# every run file damaged in turn, in a run stopped mid fine-tuning of iteration 2 and in a finished run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size // 4)))


DAMAGE = {"deleted": Path.unlink, "truncated": _truncate, "garbled": _garble, "emptied": lambda p: p.write_bytes(b"")}


@pytest.fixture(scope="module")
def stopped_mid_finetuning(uninterrupted, tmp_path_factory) -> Path:
    """A run stopped by SIGTERM after the first fine-tuning step of iteration 2 (checkpoint saved)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as mp:
        signal_at_step(mp, 20 + 4 + 1, lambda: stop.request(signal.SIGTERM))  # pretraining, iteration 1, a step
        assert run_code(out) == 128 + signal.SIGTERM
    assert len(read_rows(out)) == 2 and (out / "checkpoints" / "finetune.pt").is_file()
    return out


def signal_at_step(mp, n: int, send) -> None:
    """Call ``send()`` during the ``n``-th training step of the run (pretraining's included)."""
    from rdprune.training.local_engine import LocalEngine

    real, steps = LocalEngine.train_step, []

    def step(self, x, y) -> float:
        steps.append(1)
        if len(steps) == n:
            send()
        return real(self, x, y)

    mp.setattr(LocalEngine, "train_step", step)


def _damage_each_file(run: Path, reference: dict, tmp_path: Path, capsys, counts, kinds=tuple(DAMAGE)) -> dict[str, str]:
    """Each file of ``run`` damaged in each of ``kinds`` in turn, then rerun. Of a folder's curve pieces, all
    alike, the first stands for the others."""
    refusals = REFUSALS
    files, folders = [], set()
    for path in sorted(p for p in run.rglob("*") if p.is_file() and p.name != ".lock"):
        if path.name.endswith(".curve.pt"):
            if path.parent in folders:
                continue
            folders.add(path.parent)
        files.append(path.relative_to(run))
    for name in files:
        for how in kinds:
            damage = DAMAGE[how]
            out = tmp_path / "damaged"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(run, out)
            if how != "deleted" and (out / name).stat().st_size == 0:
                continue
            damage(out / name)
            refused = resume_and_judge(out, reference, capsys, counts, f"{name} {how}")
            if refused:
                refusals[f"{name} {how}"] = refused
    return refusals


@pytest.mark.slow
def test_every_file_of_a_stopped_run_damaged_in_turn(uninterrupted, stopped_mid_finetuning, tmp_path, capsys):
    counts = OUTCOMES["damaged files, stopped run"]
    refusals = _damage_each_file(stopped_mid_finetuning, uninterrupted[2], tmp_path, capsys, counts)
    for what, line in refusals.items():  # each refusal names the damaged file
        assert what.split()[0].split("/")[-1] in line or "results.jsonl" in line, (what, line)


@pytest.mark.slow
def test_every_file_of_a_finished_run_damaged_in_turn(uninterrupted, tmp_path, capsys):
    counts = OUTCOMES["damaged files, finished run"]
    # emptied is left out here (the stopped run's test has it): the suite's time is bounded
    refusals = _damage_each_file(uninterrupted[0], uninterrupted[2], tmp_path, capsys, counts,
                                 kinds=("deleted", "truncated", "garbled"))
    for what, line in refusals.items():
        assert what.split()[0].split("/")[-1] in line or "results.jsonl" in line, (what, line)


def test_key_files_damaged_resume_or_refuse(uninterrupted, stopped_mid_finetuning, tmp_path, capsys):
    """The fast share of the damage tests: the files a resume reads."""
    counts = OUTCOMES["damaged key files"]
    for name in ("results.jsonl", "resume_key.json", "checkpoints/last.pt", "checkpoints/finetune.pt",
                 "allocation/iter_01.json", "pretrained.pt"):
        for how, damage in DAMAGE.items():
            out = tmp_path / "damaged"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(stopped_mid_finetuning, out)
            damage(out / name)
            refused = resume_and_judge(out, uninterrupted[2], capsys, counts, f"{name} {how}")
            if refused:
                REFUSALS[f"{name} {how}"] = refused
                assert str(out / name) in refused or "results.jsonl" in refused, (name, how, refused)


# signals


def test_sigterm_mid_finetuning_saves_and_the_rerun_resumes_identically(uninterrupted, stopped_mid_finetuning, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped_mid_finetuning, out)
    saved = torch.load(out / "checkpoints" / "finetune.pt", weights_only=True)
    assert (saved["iteration"], saved["step"]) == (2, 1)  # the step the stop came after, not the last checkpoint_every
    assert run_code(out, "finetune.checkpoint_every=0") == 0  # resumes from the stop's checkpoint all the same
    assert "resumed fine-tuning at step 1 of 4" in capsys.readouterr().err
    assert_same(state(out), uninterrupted[2])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_step_with_one_line(tmp_path, capsys, signum):
    """The real handler: the signal sent to this process during pretraining."""
    with pytest.MonkeyPatch.context() as mp:
        signal_at_step(mp, 3, lambda: os.kill(os.getpid(), signum))
        assert run_code(tmp_path / "run") == 128 + signum
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"rdprune: stopped by {signal.Signals(signum).name} (pretrain: stopped after "
                                            "step 3 of 20); rerun the same command to resume")
    assert signal.getsignal(signum) is not stop._note  # the handlers are the caller's again
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_a_second_ctrl_c_stops_at_once():
    stop.clear()
    stop._note(signal.SIGINT, None)
    stop._note(signal.SIGINT, None)  # the same Ctrl-C forwarded by torchrun: still a graceful stop
    stop._first_at -= stop.AGAIN_AFTER_S
    with pytest.raises(KeyboardInterrupt):
        stop._note(signal.SIGINT, None)
    stop._note(signal.SIGTERM, None)  # a repeated SIGTERM never stops at once (SLURM and torchrun both send it)
    stop.clear()


# real processes: SIGTERM and kill -9 under torchrun, 2 ranks


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    env = clean_env(OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    cmd = torchrun_command(2, "-m", "rdprune.run", *argv(out, "finetune.steps=40", "finetune.checkpoint_every=10",
                                                         "distributed.timeout_s=120", *extra))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _wait_for(out: Path, ready, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready(out):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.05)


def _rows(n: int):
    return lambda out: (out / "results.jsonl").is_file() and len((out / "results.jsonl").read_text().splitlines()) >= n


BOUNDARIES = {
    "pretraining": lambda out: (out / "provenance.json").is_file(),
    "curves of iteration 1": _rows(1),
    "fine-tuning of iteration 1": lambda out: (out / "checkpoints" / "finetune.pt").is_file(),
    "after iteration 1": _rows(2),
    "fine-tuning of iteration 2": lambda out: _rows(2)(out) and (out / "checkpoints" / "finetune.pt").is_file(),
}


KILL_POINTS = ("pretraining", "fine-tuning of iteration 1", "fine-tuning of iteration 2")


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("torchrun_reference") / "run"
    proc = _torchrun(out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    return state(out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_torchrun_stopped_at_five_boundaries_resumes_identically(torchrun_reference, tmp_path, how):
    counts = OUTCOMES[f"torchrun {how}, 2 ranks"]
    # kill -9 at three of the five points (the suite's time is bounded): SIGTERM is what is new here
    points = BOUNDARIES if how == "SIGTERM" else {k: BOUNDARIES[k] for k in KILL_POINTS}
    for where, ready in points.items():
        out = tmp_path / re.sub(r"\W+", "_", where) / "run"
        proc = _torchrun(out)
        _wait_for(out, ready, proc)
        started = time.monotonic()
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
        else:  # torchrun and its workers (each in a session of its own), at once
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log = proc.communicate(timeout=60)[0]
        counts["faults injected"] += 1
        if how == "SIGTERM":
            assert time.monotonic() - started < 20, f"{where}: took {time.monotonic() - started:.0f} s to stop"
            if proc.returncode != 0:  # 0: the run had finished already
                assert "rdprune: stopped by SIGTERM" in log and "Traceback" not in log.split("rdprune: stopped")[0], \
                    log[-3000:]
        rerun = _torchrun(out)
        relog = rerun.communicate(timeout=600)[0]
        if rerun.returncode == 0:
            assert_same(state(out), torchrun_reference)
            counts["resumed identical"] += 1
        else:
            one_line("\n".join(line for line in relog.splitlines() if line.startswith("rdprune:")))
            counts["refused with one line"] += 1


# DeepSpeed's own checkpoint writes: a rank killed before each of them, under torchrun


DEEPSPEED = ["finetune.checkpoint_every=2", "distributed.engine=deepspeed", "distributed.zero_stage=2",
             "distributed.timeout_s=120", "distributed.curve_threads=1"]


def _deepspeed_run(out: Path, writes: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The tiny run under torchrun, 2 ranks, ZeRO-2; each rank's writes listed in ``writes``; ``kill_at``
    ('<rank>:<k>') kills that rank before its k-th write."""
    writes.mkdir(parents=True, exist_ok=True)
    env = clean_env(OMP_NUM_THREADS="1", RDPRUNE_WRITES=str(writes), **({"RDPRUNE_KILL_AT": kill_at} if kill_at else {}))
    cmd = torchrun_command(2, str(SCRIPTS / "deepspeed_writes.py"), *argv(out, *DEEPSPEED))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _writes(folder: Path, rank: int, out: Path) -> list[str]:
    log = folder / f"writes.rank{rank}"
    return [str(Path(line).relative_to(out)) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_at_each_deepspeed_checkpoint_write_resumes_identically(tmp_path):
    """Every write of iteration 1's DeepSpeed checkpoint (rank 0's model states and optimizer shard, rank 1's
    shard, then the marker naming them): that rank killed before it, then the same command again."""
    pytest.importorskip("deepspeed")
    counts = OUTCOMES["DeepSpeed checkpoint writes, 2 ranks"]
    reference = tmp_path / "reference" / "run"
    done = _deepspeed_run(reference, tmp_path / "reference" / "writes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = {r: _writes(tmp_path / "reference" / "writes", r, reference) for r in (0, 1)}
    shards = {r: [(k, w) for k, w in enumerate(logs[r], 1) if "/deepspeed/" in w] for r in (0, 1)}
    tag = shards[0][0][1].split("/")[2]  # iteration 1's first checkpoint
    marker = next(k for k, w in enumerate(logs[0], 1) if w.endswith("finetune.json"))
    points = [(r, k, w) for r in (0, 1) for k, w in shards[r] if w.split("/")[2] == tag] + [(0, marker, logs[0][marker - 1])]
    assert sorted(w.rsplit("/", 1)[-1] for _, _, w in points) == sorted([
        "finetune.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]), points
    expected = state(reference)
    for rank, k, what in points:
        out, writes = tmp_path / f"killed{rank}_{k}" / "run", tmp_path / f"killed{rank}_{k}" / "writes"
        killed = _deepspeed_run(out, writes, f"{rank}:{k}")
        assert killed.returncode != 0, f"rank {rank} was not killed before {what}"
        assert _writes(writes, rank, out) == logs[rank][:k - 1], f"rank {rank} wrote in another order than the reference"
        counts["faults injected"] += 1
        rerun = _deepspeed_run(out, writes.with_name("rewrites"))
        if rerun.returncode == 0:
            assert_same(state(out), expected)
            assert not [p for p in out.rglob("*.tmp")], what
            counts["resumed identical"] += 1
        else:
            one_line("\n".join(line for line in rerun.stderr.splitlines() if line.startswith("rdprune:")))
            counts["refused with one line"] += 1
        shutil.rmtree(out.parent)
    assert counts["resumed identical"] == counts["faults injected"] == 4


def pytest_terminal_summary_counts() -> str:
    lines = [f"{name}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for name, c in OUTCOMES.items()]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if OUTCOMES:
        sys.stderr.write("\nfault injection outcomes:\n" + pytest_terminal_summary_counts() + "\n")
    for what, line in REFUSALS.items():
        sys.stderr.write(f"refused: {what}: {line}\n")
