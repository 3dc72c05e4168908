"""A resume that is never silently wrong: a run directory damaged by a kill, a lost or truncated
file, a full or read-only disk either continues exactly or stops with one line naming the file and
what to do (exit code 2, no traceback).

One tiny quickstart run (2 iterations) is made once, in-process; each test damages a copy of it.
"""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from rdprune.cli.common import run_cli
from rdprune.errors import UserError
from rdprune.files import atomic_write, atomic_write_text
from rdprune.run import main

from launch import read_rows

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["pretrain.steps=20", "finetune.steps=5", "prune.iterations=2", "calibration.size=32", "prune.levels=5",
        "run.progress=false", "run.threads=1"]


def _argv(out: Path, *extra: str) -> list[str]:
    return [QUICKSTART, *TINY, f"run.out_dir={out}", *extra]


def _succeeds(out: Path, *extra: str) -> None:
    """Run the tiny config in-process and expect exit code 0."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, _argv(out, *extra))
    assert exc.value.code == 0


def user_error(capsys, argv: list[str]) -> str:
    """Run in-process; assert it fails as a user error (exit 2, one error line, last, no traceback); return the line.

    Unlike ``cli_errors.user_error``, rdprune's log lines may precede it: these errors come after the run has begun.
    """
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rdprune: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]



def _keep_rows(out: Path, n: int) -> None:
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:n]))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("tiny") / "run"
    try:
        _succeeds(out)
    finally:
        torch.set_num_threads(threads)
    assert [r["iteration"] for r in read_rows(out, timings=False)] == [0, 1, 2]
    return out


@pytest.fixture
def damaged(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


# 1. a kill between writing checkpoints/last.pt and appending its row


def test_lost_row_after_last_checkpoint_is_refused(damaged, capsys):
    _keep_rows(damaged, 2)  # killed after last.pt of iteration 2 was written, before its row
    before = (damaged / "results.jsonl").read_text()
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'checkpoints' / 'last.pt'} holds iteration 2 but {damaged / 'results.jsonl'} ends at iteration 1" in err
    assert "cannot be rebuilt exactly" in err and "run.resume=false" in err
    assert (damaged / "results.jsonl").read_text() == before


def test_checkpoint_behind_the_rows_is_refused(damaged, capsys):
    state = torch.load(damaged / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "iteration": 1}, damaged / "checkpoints" / "last.pt")
    err = user_error(capsys, _argv(damaged))
    assert "holds iteration 1 but" in err and "ends at iteration 2: the two are not of one run state" in err


def test_lost_first_row_redoes_the_first_iteration_from_the_dense_model(finished, damaged):
    _keep_rows(damaged, 1)  # last.pt (iteration 2) is stale: the pretrained model continues
    _succeeds(damaged)
    assert read_rows(damaged, timings=False) == read_rows(finished, timings=False)


# 2. pretrained.pt lost after the dense row


def test_missing_pretrained_model_after_the_dense_row_is_refused(damaged, capsys):
    _keep_rows(damaged, 1)
    (damaged / "pretrained.pt").unlink()
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'pretrained.pt'} is missing" in err and "records iteration 0" in err
    assert "restore the file, or set run.resume=false" in err
    assert len(read_rows(damaged, timings=False)) == 1


def test_missing_pretrained_model_to_rewind_to_is_refused(damaged, capsys):
    _keep_rows(damaged, 2)
    (damaged / "pretrained.pt").unlink()
    key = json.loads((damaged / "resume_key.json").read_text())
    key["finetune"]["rewind"] = True  # as if the run had been made with finetune.rewind=true
    (damaged / "resume_key.json").write_text(json.dumps(key))
    err = user_error(capsys, _argv(damaged, "finetune.rewind=true"))
    assert f"{damaged / 'pretrained.pt'} is missing" in err and "rewinds to it (finetune.rewind)" in err


# 3. one line, not a traceback


@pytest.mark.parametrize("damage", [_truncate, lambda p: p.write_bytes(b""), lambda p: p.write_bytes(os.urandom(300))],
                         ids=["truncated", "empty", "random"])
def test_unreadable_last_checkpoint_is_one_line(damaged, capsys, damage):
    damage(damaged / "checkpoints" / "last.pt")
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'checkpoints' / 'last.pt'} is not a readable checkpoint" in err


def test_last_checkpoint_of_another_model_is_one_line(damaged, capsys):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "iteration": 2}, damaged / "checkpoints" / "last.pt")
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'checkpoints' / 'last.pt'} does not fit model small_cnn" in err


def test_truncated_pretrained_model_is_one_line(damaged, capsys):
    _keep_rows(damaged, 1)
    _truncate(damaged / "pretrained.pt")
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'pretrained.pt'} is not a readable checkpoint" in err


@pytest.mark.parametrize("line, what", [
    ("[1, 2]", "is not a result row"),
    ('{"top1": 50.0}', "is not a result row"),
    ('{"iteration": "2"}', "is not a result row"),
    ('{"iteration": 5}', "records iteration 5 where iteration 2 belongs"),
])
def test_bad_results_row_is_one_line(damaged, capsys, line, what):
    _keep_rows(damaged, 2)
    with open(damaged / "results.jsonl", "a") as f:
        f.write(line + "\n")
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'results.jsonl'} line 3 {what}" in err


@pytest.mark.parametrize("text", ['{"model": {"name": ', "[]", "\xff\xfe"])
def test_garbled_resume_key_is_one_line(damaged, capsys, text):
    (damaged / "resume_key.json").write_bytes(text.encode("latin-1"))
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'resume_key.json'} is not the JSON object that names this run's config" in err


def test_fewer_classes_than_the_data_is_refused_before_any_work(capsys, tmp_path):
    err = user_error(capsys, _argv(tmp_path / "run", "model.num_classes=3"))
    assert "model.num_classes is 3, but data mnist5k has 10 classes" in err
    assert not (tmp_path / "run").exists()


# 4. durable writes, and no temporary files left behind


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", str(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    atomic_write_text(tmp_path / "r.txt", "text")
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert Path(tmp).name.startswith(".r.txt.") and tmp.endswith(".tmp")


def test_temporary_files_of_a_killed_run_are_removed_at_the_next_start(damaged):
    leftovers = [damaged / ".results.jsonl.k2j3h4l5.tmp", damaged / "checkpoints" / ".last.pt.a_b1c2d3.tmp",
                 damaged / "curves" / "iter_01" / ".conv1.pt.zz9yy8xx.tmp"]
    kept = [damaged / "keep.tmp", damaged / ".notes.tmp", damaged / ".notes.txt.abcdefgh.tmp.bak"]
    for path in leftovers + kept:
        path.write_text("half")
    _succeeds(damaged)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)


# 5. a full or read-only disk


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "free space there"), (errno.EACCES, "allow writing there"),
                                        (errno.EROFS, "choose a writable file system")])
def test_write_errors_a_user_fixes_are_one_line(tmp_path, code, hint):
    def fail(tmp: str) -> None:
        raise OSError(code, os.strerror(code), tmp)

    with pytest.raises(UserError) as exc:
        atomic_write(tmp_path / "r.txt", fail)
    assert str(exc.value) == (f"cannot write {tmp_path / 'r.txt'}: {os.strerror(code)}; {hint}, "
                              "or choose another folder (run.out_dir)")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # any other error stays itself
        atomic_write(tmp_path / "r.txt", lambda tmp: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))


def test_full_disk_during_a_run_is_one_line(capsys, tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    err = user_error(capsys, _argv(tmp_path / "run"))
    assert f"cannot write {tmp_path / 'run'}" in err and "No space left on device; free space there" in err
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


def test_read_only_run_folder_is_one_line(capsys, tmp_path, monkeypatch):
    mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == tmp_path / "run":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    err = user_error(capsys, _argv(tmp_path / "run"))
    assert f"cannot write {tmp_path / 'run' / '.lock'}: Read-only file system; choose a writable file system" in err


# 6. cheap checks before the latency table is timed; a busy directory refused before it too

CHANNELS = str(ROOT / "configs" / "quickstart_channels.yaml")


@pytest.fixture
def untimed(monkeypatch):
    """Timing a latency table fails the test: what is checked here must be refused before it."""
    from rdprune.granularity.channel.latency import LatencyTable

    def timed(*args, **kwargs):
        raise AssertionError("the latency table was timed before a cheap check refused the run")

    monkeypatch.setattr(LatencyTable, "build", timed)


def test_too_many_recalibration_images_are_refused_before_the_latency_table(capsys, tmp_path, untimed):
    err = user_error(capsys, [CHANNELS, f"run.out_dir={tmp_path / 'run'}", "calibration.bn_images=100000",
                              "run.progress=false"])
    assert "calibration.bn_images is 100000, but the training set has" in err
    assert not (tmp_path / "run").exists()


def test_a_busy_directory_is_refused_before_the_latency_table(capsys, tmp_path, untimed):
    from rdprune.pipeline.run_dir import RunLock

    with RunLock(tmp_path / "run"):
        err = user_error(capsys, [CHANNELS, f"run.out_dir={tmp_path / 'run'}", "run.progress=false"])
    assert f"output directory {tmp_path / 'run'} is in use by pid {os.getpid()}" in err


# 7. the run's own files unreadable, a finished run in a read-only directory


def test_unreadable_results_are_one_line(damaged, capsys, monkeypatch):
    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "results.jsonl":  # root reads any file: the permission error is simulated
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    err = user_error(capsys, _argv(damaged))
    assert err == (f"rdprune: error: cannot read {damaged / 'results.jsonl'}: Permission denied; allow reading it "
                   "(and the folders above it), or choose another run.out_dir")


def _read_only(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """Writing under ``folder`` fails as on a read-only file system (root writes anywhere: simulated)."""
    import builtins

    real_open, mkstemp = builtins.open, tempfile.mkstemp

    def no_write_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).is_relative_to(folder) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    def no_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(folder):
            raise OSError(code, os.strerror(code), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(builtins, "open", no_write_open)
    monkeypatch.setattr(tempfile, "mkstemp", no_mkstemp)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_finished_run_in_a_read_only_directory_is_reported(finished, damaged, capsys, monkeypatch, code):
    _read_only(monkeypatch, damaged, code)
    before = {p: p.stat().st_mtime_ns for p in damaged.rglob("*")}
    with pytest.raises(SystemExit) as exc:
        run_cli(main, _argv(damaged))
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert "holds this config's finished run and cannot be written" in captured.err
    assert "results, final model and plots in" in captured.out
    assert {p: p.stat().st_mtime_ns for p in damaged.rglob("*")} == before


def test_unfinished_run_in_a_read_only_directory_is_one_line(damaged, capsys, monkeypatch):
    _keep_rows(damaged, 2)
    state = torch.load(damaged / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "iteration": 1}, damaged / "checkpoints" / "last.pt")
    _read_only(monkeypatch, damaged)
    err = user_error(capsys, _argv(damaged))
    assert f"cannot write {damaged / '.lock'}: Read-only file system; choose a writable file system" in err


def test_out_dir_under_a_read_only_folder_is_one_line(capsys, tmp_path, monkeypatch):
    _read_only(monkeypatch, tmp_path)
    mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.is_relative_to(tmp_path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    err = user_error(capsys, _argv(tmp_path / "ro" / "run"))
    assert f"cannot write {tmp_path / 'ro' / 'run' / '.lock'}: Read-only file system" in err


# 8. a lost allocation file


def test_lost_last_allocation_is_rebuilt_from_the_last_checkpoint(finished, damaged, caplog):
    (damaged / "allocation" / "iter_02.json").unlink()
    _succeeds(damaged)
    assert (damaged / "allocation" / "iter_02.json").read_text() == (finished / "allocation" / "iter_02.json").read_text()
    assert "allocation/iter_02.json was missing: rebuilt from the model of iteration 2" in caplog.text


@pytest.mark.parametrize("damage", [Path.unlink, lambda p: p.write_text("{")], ids=["lost", "garbled"])
def test_lost_earlier_allocation_is_one_line(damaged, capsys, damage):
    damage(damaged / "allocation" / "iter_01.json")
    err = user_error(capsys, _argv(damaged))
    assert f"{damaged / 'allocation' / 'iter_01.json'} is " in err
    assert "it records iteration 1's per-layer choice, which this run cannot derive again" in err


def test_torch_save_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """torch's own writer says "unexpected pos" on a full disk; the file object it now writes to says ENOSPC."""
    import builtins

    from rdprune.files import atomic_torch_save

    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if str(file).endswith(".tmp") and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(UserError) as exc:
        atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "m.pt")
    assert str(exc.value) == (f"cannot write {tmp_path / 'm.pt'}: No space left on device; free space there, "
                              "or choose another folder (run.out_dir)")
    assert list(tmp_path.iterdir()) == []
