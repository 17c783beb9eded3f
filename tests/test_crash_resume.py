"""Crash consistency: a killed or disk-starved run leaves complete files only, and resumes to the same result.

The default run checks the pieces (atomic files and folders under a full disk, checkpoint writes, the CSV log,
step markers, resuming from the checkpoint of the last epoch) and one full-disk run of the command line in a
subprocess under a file-size limit. The kill loops (``slow``) SIGKILL ``mindvis pretrain`` and ``mindvis
demo`` at random moments many times over and check, after every kill, that each checkpoint, log, config and
weights folder present is complete and readable, that the checkpoint never goes back in time, and in the end
that the resumed runs reach exactly (bit for bit, on the CPU, one thread) the weights of uninterrupted ones.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import SMOKE_PRESET
from mindvis.errors import CheckpointError, MindVisError
from mindvis.utils import io as mio
from mindvis.utils.io import (
    DiskFullError,
    atomic_dir,
    atomic_write,
    remove_stale_temps,
    save_npz_atomic,
    write_json,
)
from mindvis.utils.steps import StepRunner

REPO = Path(__file__).resolve().parents[1]
# one thread: bit-identical float reductions from run to run (and tiny models train fastest that way)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temp_leftovers(root: Path) -> list[Path]:
    """Temporary names of :mod:`mindvis.utils.io` anywhere under ``root``."""
    return [p for p in root.rglob(".*") if mio._TEMP_RE.match(p.name)]


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def csv_dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def mindvis_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from mindvis.cli import main; sys.exit(main())", *args]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **SUBPROCESS_ENV, "MINDVIS_LOG_DIR": str(tmp_path / "logs")}


# ----------------------------------------------------------------------------------------------------------
# full disk: atomic files and folders
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, where):
    target = tmp_path / "ckpt.bin"
    with atomic_write(target) as fh:
        fh.write(b"previous")
    if where == "fsync":
        monkeypatch.setattr(mio.os, "fsync", _enospc)
    elif where == "replace":
        monkeypatch.setattr(mio.os, "replace", _enospc)
    with pytest.raises(DiskFullError) as info, atomic_write(target) as fh:
        fh.write(b"new and longer")
        if where == "write":
            _enospc()
    assert isinstance(info.value, MindVisError)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_other_os_errors_are_not_reported_as_a_full_disk(tmp_path):
    with pytest.raises(PermissionError), atomic_write(tmp_path / "x") as fh:
        fh.write(b"1")
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_json_and_npz_writers_on_a_full_disk(tmp_path, monkeypatch):
    import numpy as np

    write_json(tmp_path / "a.json", {"v": 1})
    save_npz_atomic(tmp_path / "b.npz", x=np.arange(3))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(mio.os, "fsync", _enospc)
    with pytest.raises(DiskFullError):
        write_json(tmp_path / "a.json", {"v": 2})
    with pytest.raises(DiskFullError):
        save_npz_atomic(tmp_path / "b.npz", x=np.arange(1000))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_atomic_dir_on_a_full_disk_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(DiskFullError, match="model"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("v2")
        _enospc()
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # and replacing works, leaving nothing beside it
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("v3")
    assert (out / "weights").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = mio._HOST
    stale_file = tmp_path / f".last.ckpt.{host}-{dead.pid}.abc123.tmp"
    stale_dir = tmp_path / f".model.{host}-{dead.pid}.xyz.partial"
    live_file = tmp_path / f".last.ckpt.{host}-{os.getpid()}.def456.tmp"
    other_host = tmp_path / f".last.ckpt.00000000-{dead.pid}.ghi.tmp"
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "x").write_text("half")
    live_file.write_bytes(b"writing")
    other_host.write_bytes(b"maybe live elsewhere")
    (tmp_path / "last.ckpt").write_bytes(b"complete")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_file.name, stale_dir.name])
    assert live_file.exists() and other_host.exists() and (tmp_path / "last.ckpt").exists()
    # restricted to one target name
    stale_file.write_bytes(b"half")
    assert remove_stale_temps(tmp_path, "other.ckpt") == []
    assert remove_stale_temps(tmp_path, "last.ckpt") == [stale_file]
    # in sub-folders
    deep = tmp_path / "a" / "b" / f".metrics.csv.{host}-{dead.pid}.q.tmp"
    deep.parent.mkdir(parents=True)
    deep.write_text("half")
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path, recursive=True) == [deep]


def test_checkpoint_io_on_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from mindvis.safeload import load_torch_file
    from mindvis.train.run_folder import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(mio.os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match="last.ckpt"):
        io_.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert load_torch_file(path)["epoch"] == 1
    assert temp_leftovers(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a really full disk); skipped where mounting is not allowed (not root)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_checkpoint_on_a_really_full_disk(small_tmpfs):
    from mindvis.safeload import load_torch_file
    from mindvis.train.run_folder import AtomicCheckpointIO

    path = small_tmpfs / "checkpoints" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(150_000)}}, path)  # 600 kB of 1 MiB
    before = path.read_bytes()
    with pytest.raises(DiskFullError, match="No space left"):
        io_.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(150_000)}}, path)
    assert path.read_bytes() == before and load_torch_file(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone


def test_csv_log_keeps_unwritten_rows_for_the_next_save(tmp_path, monkeypatch):
    from mindvis.train.callbacks import CSVMetricsLogger

    log = CSVMetricsLogger(tmp_path / "metrics.csv")
    log.log_metrics({"loss": 1.0, "epoch": 0}, step=0)
    log.save()
    good = (tmp_path / "metrics.csv").read_text()
    log.log_metrics({"loss": 0.5, "val": 0.1, "epoch": 0}, step=1)
    with monkeypatch.context() as m:
        m.setattr(mio.os, "fsync", _enospc)
        with pytest.raises(DiskFullError):
            log.save()
    assert (tmp_path / "metrics.csv").read_text() == good
    log.save()
    rows = csv_dicts(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1"] and rows[1]["val"] == "0.1"


def test_step_markers_damaged_or_missing_output_mean_not_done(tmp_path):
    calls = []

    def step():
        calls.append(1)
        (tmp_path / "out").mkdir(exist_ok=True)
        return {"folder": str(tmp_path / "out")}

    StepRunner(tmp_path).run("a", {"x": 1}, step)
    StepRunner(tmp_path).run("a", {"x": 1}, step)
    assert len(calls) == 1
    runner = StepRunner(tmp_path)
    runner.marker("a").write_text('{"step": "a", "fingerp')  # as if written in place and cut off
    runner.run("a", {"x": 1}, step)
    assert len(calls) == 2
    shutil.rmtree(tmp_path / "out")
    StepRunner(tmp_path).run("a", {"x": 1}, step)
    assert len(calls) == 3
    StepRunner(tmp_path).run("a", {"x": 2}, step)
    assert len(calls) == 4


# ----------------------------------------------------------------------------------------------------------
# training: resume from the checkpoint of the last epoch; full disk through the command line
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_from_the_final_checkpoint_exports_the_model(tmp_path, one_thread):
    """Killed after the last checkpoint but before ``model/`` was written: ``--resume`` writes ``model/``."""
    from mindvis.models.folder import load_safetensors
    from mindvis.train.mbm import run_mbm_stage
    from test_train_mbm import tiny_config, write_lowrank_hcp

    hcp = write_lowrank_hcp(tmp_path, samples=32)
    cfg = tiny_config(hcp, epochs=2)
    run = tmp_path / "run"
    run_mbm_stage(cfg, run)
    first = load_safetensors(run / "model" / "model.safetensors")
    shutil.rmtree(run / "model")
    result = run_mbm_stage(cfg, run, resume=True)
    assert result.epochs_done == 2
    again = load_safetensors(run / "model" / "model.safetensors")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_cli_full_disk_is_one_line_and_keeps_the_checkpoint(tmp_path, one_thread):
    """A file-size limit (what a full disk looks like to a writer) hits the checkpoint of a resumed run."""
    from mindvis.train.mbm import run_mbm_stage
    from mindvis.train.run_folder import read_checkpoint_progress
    from test_train_mbm import tiny_config, write_lowrank_hcp

    hcp = write_lowrank_hcp(tmp_path, samples=32)
    run = tmp_path / "run"
    run_mbm_stage(tiny_config(hcp, epochs=1), run)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "data" not in p.parts}
    # small files (config, log) still fit under the limit; a checkpoint does not
    limit = max(64 * 1024, max(len(b) for p, b in before.items() if p.suffix in (".json", ".csv")) * 4)
    assert ckpt.stat().st_size > limit

    def limit_file_size():  # pragma: no cover - runs in the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(
        mindvis_cmd("pretrain", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"),
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "File too large" in errors[0] or "No space" in errors[0], errors[0]
    assert "unchanged" in errors[0] and str(run) in errors[0]
    assert ckpt.read_bytes() == before[ckpt]
    assert read_checkpoint_progress(ckpt)["epoch"] == 0
    for p in ("model/model.safetensors", "best/model.safetensors"):
        assert (run / p).read_bytes() == before[run / p], p
    assert temp_leftovers(tmp_path) == []
    rows = csv_rows(run / "metrics.csv")
    assert all(len(r) == len(rows[0]) for r in rows)


# a kill -9 from inside, right after ``checkpoints/last.ckpt`` of epoch ``argv[1]`` is in place
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from mindvis.train import run_folder
epoch = int(sys.argv.pop(1))
save = run_folder.AtomicCheckpointIO.save_checkpoint
def save_then_die(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    if os.path.basename(str(path)) == "last.ckpt" and checkpoint["epoch"] == epoch:
        os.kill(os.getpid(), signal.SIGKILL)
run_folder.AtomicCheckpointIO.save_checkpoint = save_then_die
from mindvis.cli import main
sys.exit(main())
"""


def test_cli_kill_right_after_a_checkpoint_keeps_the_log(tmp_path, one_thread, quiet_cli_logging):
    """Killed (SIGKILL) just after the checkpoint of an epoch: its rows, the epoch-end row included, are already
    in ``metrics.csv``, and ``--resume`` ends with the log of an uninterrupted run, row for row."""
    from mindvis.cli import main
    from mindvis.train.run_folder import read_checkpoint_progress
    from test_train_mbm import write_lowrank_hcp

    hcp = write_lowrank_hcp(tmp_path / "data", samples=32)
    env = subprocess_env(tmp_path)
    args = ["pretrain", "--hcp-dir", str(hcp), "--variant", "tiny", "--epochs", "3", "--batch-size", "16",
            "--patch-size", "8", "--window-trs", "1", "--accelerator", "cpu", "--devices", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    straight, run = tmp_path / "straight", tmp_path / "killed"
    assert (
        main([*args, "--out", str(straight)]) == 0
    )  # in this process (quicker); only the kill needs a child
    expected = csv_rows(straight / "metrics.csv")

    res = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, "1", *args, "--out", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert read_checkpoint_progress(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    epoch = expected[0].index("epoch")  # every row of epochs 0 and 1 is on disk with the checkpoint
    assert csv_rows(run / "metrics.csv") == expected[:1] + [r for r in expected[1:] if int(r[epoch]) <= 1]

    assert main([*args, "--out", str(run), "--resume"]) == 0
    assert csv_rows(run / "metrics.csv") == expected
    assert temp_leftovers(tmp_path) == []


class _Killed(Exception):
    """Stands for a kill: raised inside training, nothing in the code under test catches it."""


@pytest.mark.parametrize(
    ("val_every", "when"),
    [(1, "after-checkpoint"), (2, "after-checkpoint"), (1, "mid-epoch")],
)
def test_resumed_log_equals_an_uninterrupted_one(tmp_path, one_thread, monkeypatch, val_every, when):
    """Every row logged (each step, learning rates, validation, epoch ends) comes out once and the same after
    a resume: killed just after the checkpoint of epoch 1 (saved at the end of the training epoch, or at the
    end of its validation when validation runs every other epoch), or in the middle of epoch 2."""
    from lightning.pytorch.callbacks import Callback

    from mindvis.train import run_folder
    from mindvis.train.mbm import run_mbm_stage
    from test_train_mbm import tiny_config, write_lowrank_hcp

    hcp = write_lowrank_hcp(tmp_path, samples=32)

    def config():
        return tiny_config(hcp, epochs=4, trainer={"val_every_n_epochs": val_every, "log_every_n_steps": 1})

    run_mbm_stage(config(), tmp_path / "straight")
    expected = csv_rows(tmp_path / "straight" / "metrics.csv")

    class KillMidEpoch(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == 2 and args[-1] == 1:
                raise _Killed

    save = run_folder.AtomicCheckpointIO.save_checkpoint

    def save_then_die(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == 1:
            raise _Killed

    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        if when == "after-checkpoint":
            m.setattr(run_folder.AtomicCheckpointIO, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run_mbm_stage(config(), run, callbacks=[KillMidEpoch()] if when == "mid-epoch" else [])
    assert len(csv_rows(run / "metrics.csv")) < len(expected)
    run_mbm_stage(config(), run, resume=True)
    assert csv_rows(run / "metrics.csv") == expected


# ----------------------------------------------------------------------------------------------------------
# kill loops (slow)
# ----------------------------------------------------------------------------------------------------------


def check_run_folder_complete(run: Path) -> dict[str, int] | None:
    """Every checkpoint, log, config and weights folder present in a (killed) run folder is complete.

    Returns the progress of ``checkpoints/last.ckpt`` (None when there is none).
    """
    from mindvis.models.mbm import MaskedBrainModel
    from mindvis.train.run_folder import read_checkpoint_progress

    progress = None
    for ckpt in sorted(run.rglob("*.ckpt")):
        info = read_checkpoint_progress(ckpt)  # raises CheckpointError on a partial file
        if ckpt.name == "last.ckpt" and ckpt.parent == run / "checkpoints":
            progress = info
    for js in run.rglob("*.json"):
        if not js.name.startswith("."):
            json.loads(js.read_text())
    for log in run.rglob("metrics.csv"):
        rows = csv_rows(log)
        assert rows and all(len(r) == len(rows[0]) for r in rows), f"ragged {log}"
    for name in ("model", "best"):
        if (run / name).exists():
            MaskedBrainModel.from_pretrained(run / name)
    return progress


def _run_killed(
    cmd: list[str],
    env: dict,
    log: Path,
    delay: float,
    watch: Callable[[], object] | None = None,
    after: float = 0.0,
) -> int | None:
    """Start ``cmd`` and SIGKILL it; returns its exit code if it ended first.

    Without ``watch`` the kill comes ``delay`` seconds after the start. With ``watch`` (a function of the
    files written so far), it comes ``after`` seconds after the value of ``watch()`` first changes (a fresh
    checkpoint, a finished step), or after ``delay`` at the latest: kills then land inside and just after
    writes and at every stage of a run, not only in its start-up.
    """
    with open(log, "ab") as fh:
        first = watch() if watch is not None else None
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + delay
        while watch is not None and time.monotonic() < deadline and proc.poll() is None:
            if watch() != first:
                deadline = time.monotonic() + after
                break
            time.sleep(0.01)
        try:
            return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _train_mode(run: Path) -> list[str]:
    if (run / "checkpoints" / "last.ckpt").is_file():
        return ["--resume"]
    return ["--overwrite"] if run.exists() else []


def _timed_run(cmd: list[str], env: dict, first_file: Path) -> tuple[float, float]:
    """Run ``cmd`` to the end; returns (seconds until ``first_file`` appeared, total seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and first_file.exists():
            first = time.perf_counter() - t0
        time.sleep(0.01)
    total = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr.read().decode(errors="replace")[-3000:]
    return (first if first is not None else total), total


@pytest.mark.slow
def test_kill_loop_pretrain_resumes_to_the_same_weights(tmp_path):
    from mindvis.models.folder import load_safetensors
    from test_train_mbm import write_lowrank_hcp

    cycles = int(os.environ.get("MINDVIS_KILL_CYCLES", "16"))
    rng = random.Random(int(os.environ.get("MINDVIS_KILL_SEED", "0")))
    hcp = write_lowrank_hcp(tmp_path / "data", samples=48)
    env = subprocess_env(tmp_path)
    epochs = 4 * cycles
    args = ["pretrain", "--hcp-dir", str(hcp), "--variant", "tiny", "--epochs", str(epochs), "--batch-size", "16",
            "--patch-size", "8", "--window-trs", "1", "--accelerator", "cpu", "--devices", "1",
            "--no-progress"]  # fmt: skip
    straight = tmp_path / "straight"
    startup, full = _timed_run(
        mindvis_cmd(*args, "--out", str(straight)), env, straight / "checkpoints" / "last.ckpt"
    )
    epoch_time = max(full - startup, 0.1) / epochs

    run = tmp_path / "killed"
    log = tmp_path / "killed.log"
    last = run / "checkpoints" / "last.ckpt"
    epochs_seen: list[int] = []
    kills = attempts = 0
    while kills < cycles and attempts < 3 * cycles:
        attempts += 1
        cmd = mindvis_cmd(*args, "--out", str(run), *_train_mode(run))
        if attempts % 2:  # anywhere in start-up, data preparation, the first validation, the first epochs
            rc = _run_killed(cmd, env, log, rng.uniform(0.2 * startup, startup + 3 * epoch_time))
        else:  # just after a checkpoint was replaced: inside the next epoch, its logging and writes
            rc = _run_killed(
                cmd, env, log, 2 * full, watch=lambda: _inode(last), after=rng.uniform(0.0, 1.5 * epoch_time)
            )
        if rc is not None:
            assert rc == 0, log.read_text(errors="replace")[-3000:]
            break  # training is complete
        kills += 1
        if not run.exists():
            continue
        progress = check_run_folder_complete(run)
        if progress is not None:
            assert not epochs_seen or progress["epoch"] >= epochs_seen[-1], "the checkpoint went back"
            epochs_seen.append(progress["epoch"])
        assert len(temp_leftovers(tmp_path)) <= 2, temp_leftovers(tmp_path)
    res = subprocess.run(
        mindvis_cmd(*args, "--out", str(run), *_train_mode(run)), env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    print(
        f"pretrain kill loop: {kills} kills in {attempts} attempts (start-up {startup:.1f} s, "
        f"{epoch_time:.2f} s per epoch); checkpoint epoch after each kill: {epochs_seen}"
    )
    assert kills >= cycles // 2
    check_run_folder_complete(run)
    assert temp_leftovers(tmp_path) == []
    for name in ("model", "best"):
        a = load_safetensors(straight / name / "model.safetensors")
        b = load_safetensors(run / name / "model.safetensors")
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}/{k} differs after resuming"
    assert csv_rows(run / "metrics.csv") == csv_rows(straight / "metrics.csv")  # the whole log, row for row


def test_checkpoint_checker_catches_a_cut_file(tmp_path):
    """The kill loop's completeness check itself: a checkpoint cut short is detected."""
    from mindvis.train.run_folder import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "state_dict": {"w": torch.ones(100)}}, path)
    assert check_run_folder_complete(tmp_path) == {"epoch": 0, "global_step": 0}
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 300])
    with pytest.raises(CheckpointError):
        check_run_folder_complete(tmp_path)


def check_tree_complete(root: Path) -> None:
    """Every file of a (killed) demo run folder that is in place is complete and readable."""
    import numpy as np
    from safetensors import safe_open

    from mindvis.train.run_folder import read_checkpoint_progress

    for p in root.rglob("*"):
        if not p.is_file() or mio._TEMP_RE.match(p.name) or any(mio._TEMP_RE.match(q) for q in p.parts):
            continue
        if p.suffix == ".ckpt":
            read_checkpoint_progress(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            rows = csv_rows(p)
            assert all(len(r) == len(rows[0]) for r in rows), f"ragged {p}"
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118
                    fh.get_tensor(k)
        elif p.suffix == ".npz":
            with np.load(p) as z:
                for k in z.files:
                    z[k]
        elif p.suffix == ".yaml":
            import yaml

            yaml.safe_load(p.read_text())


@pytest.mark.slow
def test_kill_loop_demo_resumes_to_the_same_results(tmp_path):
    """``mindvis demo --preset smoke`` killed again and again, then finished, equals an uninterrupted run."""
    from test_reproducibility import differences

    cycles = int(os.environ.get("MINDVIS_DEMO_KILL_CYCLES", "14"))
    rng = random.Random(int(os.environ.get("MINDVIS_KILL_SEED", "0")))
    env = subprocess_env(tmp_path)
    run = tmp_path / "run"
    cmd = mindvis_cmd("demo", "--preset", SMOKE_PRESET, "--run-dir", str(run), "--no-progress")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    full = time.perf_counter() - t0
    reference = tmp_path / "reference"
    shutil.move(run, reference)  # the same path for both runs: recorded paths agree

    log = tmp_path / "killed.log"
    kills = attempts = 0
    markers: list[int] = []

    def state() -> tuple:
        """Finished steps and the identity of every checkpoint file: changes when the run moves on."""
        steps = sorted(p.name for p in (run / "steps").glob("*.json"))
        ckpts = sorted((str(p), _inode(p)) for p in run.glob("*/**/*.ckpt"))
        return tuple(steps), tuple(ckpts)

    while kills < cycles and attempts < 3 * cycles:
        attempts += 1
        if attempts % 2:  # anywhere, mostly start-up and the step being resumed
            rc = _run_killed(cmd, env, log, rng.uniform(0.1, 0.35) * full)
        else:  # shortly after the run moved on: the next step's start, the next epoch, the next writes
            rc = _run_killed(cmd, env, log, full, watch=state, after=rng.uniform(0.0, 1.5))
        if rc is not None:
            assert rc == 0, log.read_text(errors="replace")[-3000:]
            break
        kills += 1
        if run.exists():
            check_tree_complete(run)
            markers.append(len(list((run / "steps").glob("*.json"))))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"demo kill loop: {kills} kills in {attempts} attempts (uninterrupted run {full:.0f} s); finished "
          f"steps after each kill: {markers}")  # fmt: skip
    assert kills >= cycles // 2
    check_tree_complete(run)
    assert temp_leftovers(run) == []
    assert differences(reference, run) == []


def test_stage_b_resume_after_the_last_checkpoint_keeps_the_final_metrics(tmp_path, one_thread):
    from mindvis.models.mbm import MaskedBrainModel, mbm_tiny
    from mindvis.train.ldm import train_stage_b
    from mindvis.train.prior import PriorTrainConfig, build_class_prior, save_prior_pipeline
    from test_train_ldm import RES, _config, _datasets, _trainer

    torch.manual_seed(0)
    pdir, mdir = tmp_path / "prior", tmp_path / "mbm"
    save_prior_pipeline(
        build_class_prior(PriorTrainConfig(preset="tiny", resolution=RES).ldm_config(3), 3),
        pdir,
        ["a", "b", "c"],
    )
    MaskedBrainModel(mbm_tiny(128)).save_pretrained(mdir)
    tr, te = _datasets()
    out = tmp_path / "run"
    train_stage_b(pdir, mdir, tr, te, out, _config(), _trainer())
    first = json.loads((out / "metrics.json").read_text())["metrics"]
    assert first  # validation ran
    (out / "metrics.json").unlink()  # killed after the last checkpoint, before metrics.json
    train_stage_b(pdir, mdir, tr, te, out, _config(), _trainer(), resume=True)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == first
