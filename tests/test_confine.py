"""The confinement's plan (what the submission's process will see) and the publishing of what it compiled; the
whole confinement runs in tests/test_cheats.py (forge_records, as root)."""

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from moebench.modes import confine

USER_RUN = SimpleNamespace(isolation="user")


def test_without_root_isolation_is_partial_and_says_why(tmp_path):
    view, why = confine.plan(USER_RUN, tmp_path / "qwen.py", "0" * 64, [], tmp_path / "traced_model", False, euid=1000)
    assert view is None and "does not run as root" in why
    view, why = confine.plan(SimpleNamespace(isolation="process"), tmp_path / "qwen.py", "0" * 64, [],
                             tmp_path / "traced_model", False, euid=0)
    assert view is None and "--isolation process" in why


@pytest.mark.skipif(os.geteuid() != 0, reason="the view is planned only as root")
def test_the_view_holds_the_module_its_python_helpers_the_model_and_nothing_else_of_the_folder(tmp_path):
    (tmp_path / "qwen.py").write_text("")
    (tmp_path / "helpers.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "data").mkdir()  # not a package
    for name in ("expected_logits_0.pt", "team_score_records.csv", "team_score_records.jsonl", "prompts.txt"):
        (tmp_path / name).write_text("secret")
    model = tmp_path / "model"
    model.mkdir()
    view, why = confine.plan(USER_RUN, tmp_path / "qwen.py", "ab" * 32, [model], tmp_path / "traced_model", False)
    try:
        seen = {path: writable for _, path, writable in view.binds}
        inside = {Path(p).name for p in seen if Path(p).parent == tmp_path}
        assert inside == {"qwen.py", "helpers.py", "kernels", "model", "traced_model"}
        assert seen[str(tmp_path / "traced_model")] and not seen[str(model)]  # compiled into, read only
        assert [s for s, p, _ in view.binds if p == str(tmp_path / "traced_model")] == [view.stage]
        assert view.uid in confine.USERS and os.stat(view.stage).st_uid == view.uid
        assert os.stat(view.cache).st_gid == confine.GID and os.stat(view.cache).st_mode & 0o7777 == 0o2770
        assert view.cwd == os.getcwd()
        # Inductor's default cache folder in the empty /tmp is the module's: its precompiled headers are kept
        assert [(s, w) for s, p, w in view.binds if p == f"/tmp/torchinductor_{confine.USER}"] == \
            [(os.path.realpath(Path(view.cache, "inductor")), True)]
    finally:
        confine.discard(view)
    reused, _ = confine.plan(USER_RUN, tmp_path / "qwen.py", "ab" * 32, [], tmp_path / "traced_model", True)
    confine.discard(reused)
    assert reused.stage is None  # --skip-compile: the folder itself, read only
    assert [w for _, p, w in reused.binds if p == str(tmp_path / "traced_model")] == [False] or \
        not (tmp_path / "traced_model").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the view is planned only as root")
def test_each_evaluation_has_a_user_of_its_own_whose_processes_are_paused_and_then_killed(tmp_path):
    import subprocess
    import time

    def state(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return None

    (tmp_path / "qwen.py").write_text("")
    one, _ = confine.plan(USER_RUN, tmp_path / "qwen.py", "cd" * 32, [], tmp_path / "a", False)
    two, _ = confine.plan(USER_RUN, tmp_path / "qwen.py", "cd" * 32, [], tmp_path / "b", False)
    try:
        assert one.uid != two.uid  # held by one evaluation each: neither can signal the other's processes
        # as a submission's double fork leaves behind: a process of the user, in a session of its own
        left = [subprocess.Popen(["sleep", "60"], user=view.uid, group=confine.GID, start_new_session=True)
                for view in (one, two)]
        def eventually(pid, want):  # a signal takes effect once the kernel runs its process: a moment
            for _ in range(100):
                if state(pid) == want:
                    return True
                time.sleep(0.05)
            return False

        with confine.paused(one, None):
            assert eventually(left[0].pid, "T") and state(left[1].pid) == "S"
        assert eventually(left[0].pid, "S")
        confine.discard(one)
        assert left[0].wait(10) == -9 and left[1].poll() is None
        assert one.lock == -1 and _free(one.uid)  # released (another evaluation may take it from now on)
        # a view discarded twice kills nothing the second time: its user may be another evaluation's by then
        confine.discard(dataclasses.replace(two, lock=-1))
        time.sleep(0.2)
        assert left[1].poll() is None
    finally:
        confine.discard(one)
        confine.discard(two)
    assert left[1].wait(10) == -9


def _free(uid: int) -> bool:
    """Whether no evaluation holds the sandbox user uid (its lock file can be taken, and is given back at once)."""
    import fcntl
    import tempfile

    fd = os.open(Path(tempfile.gettempdir(), "moebench-sandbox", f"user-{uid}.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_publishing_copies_moebench_files_and_folders_never_links_or_other_files(tmp_path):
    stage, artifacts = tmp_path / "stage", tmp_path / "traced_model"
    (stage / "graphs" / "tp0").mkdir(parents=True)
    (stage / "graphs" / "tp0" / "new.pt2").write_text("graph")
    (stage / "manifest.json").write_text("{}")
    (stage / "compiled_code_tp0.bin").symlink_to("/etc/passwd")  # planted: would copy a file the child cannot read
    (stage / "graphs" / "tp0" / "link.pt2").symlink_to("/etc/passwd")
    (stage / "notes.txt").write_text("not an artifact")
    (artifacts / "graphs" / "tp0").mkdir(parents=True)
    (artifacts / "graphs" / "tp0" / "old.pt2").write_text("stale")
    (artifacts / "compiled_code_tp0.bin").write_text("stale")
    (artifacts / "mine.txt").write_text("the user's")
    view = confine.View(str(tmp_path / "root"), str(tmp_path), str(tmp_path), 60999, -1, stage=str(stage))
    confine.publish(view, artifacts)
    assert sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")) == \
        ["graphs", "graphs/tp0", "graphs/tp0/new.pt2", "manifest.json", "mine.txt"]
    assert (artifacts / "mine.txt").read_text() == "the user's"


def test_under_tensor_parallelism_each_rank_publishes_its_own_entries_and_rank_0_the_shared_ones(tmp_path):
    artifacts = tmp_path / "traced_model"
    for rank in (0, 1):
        stage = tmp_path / f"stage{rank}"
        (stage / "graphs" / f"tp{rank}").mkdir(parents=True)
        (stage / "graphs" / f"tp{rank}" / "g.pt2").write_text(f"rank {rank}")
        (stage / f"compiled_code_tp{rank}.bin").write_text(f"rank {rank}")
        (stage / "manifest.json").write_text(f"rank {rank}")
        view = confine.View(str(tmp_path / "root"), str(tmp_path), str(tmp_path), 60999, -1, stage=str(stage))
        confine.publish(view, artifacts, rank)
    assert (artifacts / "manifest.json").read_text() == "rank 0"  # rank 1 neither removed nor replaced it
    assert [(artifacts / "graphs" / f"tp{r}" / "g.pt2").read_text() for r in (0, 1)] == ["rank 0", "rank 1"]
    assert (artifacts / "compiled_code_tp1.bin").read_text() == "rank 1"
    planted = tmp_path / "stage2"
    planted.mkdir()
    (planted / "graphs").symlink_to(tmp_path / "stage0" / "graphs")  # a link above the entry: never followed
    confine.publish(confine.View("", "", "", 60999, -1, stage=str(planted)), artifacts, 0)
    assert not (artifacts / "graphs" / "tp0").exists() and (artifacts / "graphs" / "tp1").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the view is planned only as root")
def test_the_submissions_processes_cannot_stop_the_helper_that_signals_them(tmp_path):
    import subprocess
    import time

    (tmp_path / "qwen.py").write_text("")
    view, _ = confine.plan(USER_RUN, tmp_path / "qwen.py", "ef" * 32, [], tmp_path / "a", False)
    # as a daemon the submission left could: stop every process it may signal, over and over
    stopper = subprocess.Popen(["sh", "-c", "while :; do kill -STOP -1; done"], user=view.uid, group=confine.GID,
                               start_new_session=True)
    time.sleep(0.5)
    started = time.monotonic()
    with confine.paused(view, None):
        pass
    confine.discard(view)
    assert stopper.wait(10) == -9 and time.monotonic() - started < 10


def test_a_signalling_helper_that_fails_is_one_line_not_silence(monkeypatch):
    """Processes not stopped, continued or killed would let the harness time beside them, hang or leave them."""
    from moebench.errors import MoebenchError

    monkeypatch.setattr(confine.sys, "executable", "/bin/false")
    with pytest.raises(MoebenchError, match=r"signals the submission's processes \(user 60999\) failed with exit"):
        confine.signal_all(60999, confine.signal.SIGCONT)
