"""Confinement of the submission's process (--isolation user, where the harness runs as root).

Before it imports the contestant module, the child enters a private view of the filesystem that holds only what
building and running the model needs, then becomes an unprivileged user with no capabilities and no way back:

- read-only: the system's folders (/usr, /etc, ...), Python's installation and site-packages, moebench's package,
  the model folder, the contestant module with the Python files and packages beside it, and the artifacts folder
  when --skip-compile reuses it;
- writable: the artifacts folder when the child compiles (a staging copy, published by the harness once the
  child is done with it), a cache folder of the module's own (Inductor, Triton), an empty /tmp (but for Inductor's
  default cache folder in it, which is the module's cache folder too);
- absent: everything else. The working directory's expected logits, prompt data, reports and records are not in
  the view, nor is anything the harness writes while the child runs.

The child also gets network and IPC namespaces of its own (no network; under --tp-degree the host's loopback, which
the ranks' submission processes talk over), a /proc that shows only its user's
processes, and no-new-privileges (setuid programs stay unprivileged). Its user is one of USERS, in no passwd file,
held by this one evaluation while it lasts (a lock file): a process the submission leaves behind cannot signal
another evaluation's, is stopped while the harness times the reference (`paused`), and is killed with the rest of
the user's processes when the evaluation ends (`discard`). Elsewhere (not root, or no mount namespaces) isolation is
partial and the output says why.
"""

import contextlib
import ctypes
import fcntl
import os
import pwd
import shutil
import signal
import site
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moebench.errors import MoebenchError

USERS = range(60999, 60999 - 512, -1)  # the submissions' user ids, one per evaluation at a time
GID = 60999  # their group: the per-module compile caches are the group's, shared by the evaluations of one module
SIGNALLERS = len(USERS)  # a helper that signals user u's processes has real user u - SIGNALLERS: no one else's
USER = "moebench-sandbox"
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/sys")
SHARED = ("manifest.json", "tokenizer")  # an artifacts folder's entries rank 0 writes; each rank has its own too

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = \
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38


@dataclass
class View:
    """What the child will see: (host path, path in the view, writable) binds, its working directory, its cache."""

    root: str  # the mount point of the view's tmpfs (a folder of the harness's, empty on the host)
    cwd: str
    cache: str  # the module's own cache folder, writable by the group
    uid: int  # the user the child becomes, held for this evaluation
    lock: int  # the descriptor of that user's lock file
    binds: list = field(default_factory=list)
    stage: str | None = None  # host folder the child compiles into, bound at the artifacts folder's place
    network: bool = False  # keep the host's network (loopback): the ranks of a --tp-degree run talk over it

    def bind(self, path, writable: bool = False, source=None) -> None:
        path = os.path.abspath(path)
        source = os.path.realpath(source or path)
        if os.path.exists(source) and not any(_within(path, b[1]) and not b[2] for b in self.binds if not writable):
            self.binds.append((source, path, writable))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def plan(run, module: Path, module_sha: str, model_folders: list, artifacts: Path, reuse: bool,
         euid: int | None = None, network: bool = False) -> tuple[View | None, str]:
    """The view for this run, or (None, why isolation is partial here)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None, "the harness does not run as root, so the submission runs as this same user and could read " \
                     "this user's files"
    if run.isolation == "process":
        return None, "--isolation process: the submission runs as this same user and could read this user's files"
    base = _own_folder(Path(tempfile.gettempdir()) / "moebench-sandbox")
    user = _claim_user(base)
    if user is None:
        return None, f"every one of the {len(USERS)} sandbox users is held by a running evaluation, so the " \
                     "submission runs as this same user and could read this user's files"
    uid, lock = user
    try:
        return _plan(run, module, module_sha, model_folders, artifacts, reuse, network, base, uid, lock)
    except BaseException:
        discard(View("", "", "", uid, lock))
        raise


def _plan(run, module, module_sha, model_folders, artifacts, reuse, network, base, uid, lock):
    """plan's view, for the user it holds."""
    import moebench

    # One compile cache per module: a cache shared by submissions would let one plant compiled code for another.
    # MOEBENCH_SANDBOX_CACHE shares one between trusted modules (the test suite's, to compile each graph once).
    # (Named anew when the caches became the group's: the folders of older moebench hold folders only one user
    # can write to, and the next evaluation's user failed there.)
    cache = Path(os.environ.get("MOEBENCH_SANDBOX_CACHE") or base / f"group-{module_sha[:16]}").absolute()
    for folder in (cache, cache / "inductor", cache / "triton"):
        folder.mkdir(parents=True, exist_ok=True)
        os.lchown(folder, 0, GID)
        folder.chmod(0o2770)  # the group's, and so is what is made in it (the child's umask keeps it writable)
    root = base / "view"
    root.mkdir(mode=0o700, exist_ok=True)
    view = View(str(root), os.getcwd(), str(cache), uid, lock, network=network)
    for path in (sys.base_prefix, sys.prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages(),
                 Path(moebench.__file__).parent, *model_folders):
        view.bind(path)
    _bind_module(view, module)
    # Inductor keeps its precompiled C++ headers in the user's default cache folder, not TORCHINDUCTOR_CACHE_DIR: in
    # the empty /tmp every evaluation would build them anew (~7 s)
    view.bind(f"/tmp/torchinductor_{USER}", writable=True, source=cache / "inductor")
    artifacts = artifacts.absolute()
    if reuse or artifacts.exists() and not artifacts.is_dir():
        view.bind(artifacts)  # read only: --skip-compile reads; a file there is the child's error to report
    else:
        view.stage = tempfile.mkdtemp(prefix="compiled-", dir=cache)
        os.lchown(view.stage, uid, GID)
        view.bind(artifacts, writable=True, source=view.stage)
    return view, ""


def _own_folder(path: Path) -> Path:
    """path as a root-owned folder nobody else can change, or a fresh one where someone else made it first."""
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return Path(tempfile.mkdtemp(prefix="moebench-sandbox-"))
    return path


def _bind_module(view: View, module: Path) -> None:
    """The module, and the Python files and packages beside it (its helpers): nothing else of its folder."""
    view.bind(module)
    for entry in module.parent.iterdir():
        if entry.suffix == ".py" or entry.is_dir() and (entry / "__init__.py").is_file():
            view.bind(entry)


def _entries(rank: int, shared: bool) -> list[str]:
    """The entries of an artifacts folder that rank writes (Artifacts' paths), with the shared ones if it writes
    those."""
    own = [f"graphs/tp{rank}", f"compiled_code_tp{rank}.bin", f"weights/tp{rank}_sharded_checkpoint.safetensors"]
    return own + list(SHARED) * shared


def stage_from(view: View, artifacts: Path, rank: int = 0) -> None:
    """A later prompt of evaluate_all adds to the folder: the child's staging copy starts from its contents (this
    rank's, and the manifest every rank reads)."""
    if view is None or view.stage is None or not artifacts.is_dir():
        return
    for name in _entries(rank, True):
        (Path(view.stage) / name).parent.mkdir(parents=True, exist_ok=True)
        _copy(artifacts / name, Path(view.stage) / name, view.uid, GID)
    for folder in Path(view.stage).rglob("*"):
        if folder.is_dir() and not folder.is_symlink():
            os.lchown(folder, view.uid, GID)


def publish(view: View, artifacts: Path, rank: int = 0) -> None:
    """The artifacts the child compiled, from its staging folder to the artifacts folder: the entries this rank
    writes are replaced (as a compile in one process replaces them); only folders and regular files are copied,
    never a link the child may have planted."""
    if view is None or view.stage is None:
        return
    stage = Path(view.stage)
    artifacts.mkdir(parents=True, exist_ok=True)
    for name in _entries(rank, rank == 0):
        target = artifacts / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if _plain(stage, name):
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy(stage / name, target, os.getuid(), os.getgid())


def _plain(root: Path, name: str) -> bool:
    """root/name exists and no part of it below root is a link (one the child may have planted)."""
    path = root
    for part in Path(name).parts:
        path = path / part
        if not os.path.lexists(path) or os.path.islink(path):
            return False
    return True


def _copy(src: Path, dst: Path, uid: int, gid: int) -> None:
    st = os.lstat(src) if os.path.lexists(src) else None
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir(exist_ok=True)
        os.lchown(dst, uid, gid)
        for entry in src.iterdir():
            _copy(entry, dst / entry.name, uid, gid)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
        os.lchown(dst, uid, gid)


def _claim_user(base: Path) -> tuple[int, int] | None:
    """A user of USERS that no passwd entry names and no running evaluation holds: (uid, its lock's descriptor, held
    until `discard`). What a crashed harness left running as that user is killed first."""
    for uid in USERS:
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        fd = os.open(base / f"user-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        signal_all(uid, signal.SIGKILL)
        return uid, fd
    return None


# What the helper of signal_all runs: only system calls, in a Python that reads no environment and no site
_SIGNAL = """import os, sys
uid, sig, real, gid = map(int, sys.argv[1:])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(real, uid, real)
try:
    os.kill(-1, sig)
except ProcessLookupError:  # none left
    pass
os._exit(0)
"""


def signal_all(uid: int, sig: signal.Signals) -> None:
    """Sends `sig` to every process of the user uid, wherever it is (a double fork leaves the child's process group,
    never its user): kill(-1) from a helper whose effective user is uid and whose real and saved user is uid's own
    signaller (uid - SIGNALLERS, outside USERS), so it reaches exactly uid's processes, and none of them, nor
    another evaluation's helper, can signal (stop) it in turn (the ranks' helpers of --tp-degree 2, sharing one
    real user, stopped each other). The helper is spawned, not forked: a fork write-protects the harness's memory,
    which slowed the next timed request ~7%."""
    pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", _SIGNAL, str(uid), str(int(sig)),
                                          str(uid - SIGNALLERS), str(GID)], {})
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:  # the processes were not stopped, continued or killed: nothing the harness times can go on
        raise MoebenchError(f"the helper that signals the submission's processes (user {uid}) failed with exit "
                            f"code {code}: {sys.executable} -I -S could not run as root")


@contextlib.contextmanager
def paused(view: View | None, pid: int | None):
    """Every process of the submission stopped (SIGSTOP) while the harness times something else (the reference),
    so none can slow it on the CPU (GPU work already queued still runs); without a view of its own (partial
    isolation), the child's own process."""
    if view is not None:
        signal_all(view.uid, signal.SIGSTOP)
    elif pid is not None:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if view is not None:
            signal_all(view.uid, signal.SIGCONT)
        elif pid is not None:
            os.kill(pid, signal.SIGCONT)


def discard(view: View | None) -> None:
    """The evaluation is over: every process of its user is killed, its staging folder removed, the user released.
    Once only: a view discarded before no longer holds its user, which another evaluation may hold now (a second
    call killed that one's submission)."""
    if view is None or view.lock < 0:  # (discarded already)
        return
    signal_all(view.uid, signal.SIGKILL)
    if view.stage is not None:
        shutil.rmtree(view.stage, ignore_errors=True)
    os.close(view.lock)
    view.lock = -1


# ---- in the child, before anything of the submission runs ----

def enter(view: View) -> None:
    """Enters the view and becomes the view's user for good. Raises OSError only before the chroot (where the
    kernel refuses a namespace or a mount, the child stays unconfined and the harness says so); past it, a failure
    ends the process."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source, target, fstype, flags, data=None) -> None:
        enc = (lambda s: None if s is None else str(s).encode())
        check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | (0 if view.network else CLONE_NEWNET)), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = view.root
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.makedirs(root + "/dev")
    mount("/dev", root + "/dev", None, MS_BIND | MS_REC)
    os.makedirs(root + "/proc")
    try:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    except OSError:  # an older kernel: the host's /proc (other users' processes are still out of reach)
        mount("/proc", root + "/proc", None, MS_BIND | MS_REC)
    os.makedirs(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path in SYSTEM:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            view.binds.insert(0, (path, path, False))
    view.binds.append((view.cache, view.cache, True))
    for source, path, writable in sorted(view.binds, key=lambda b: b[1].count("/")):  # outer folders first
        target = root + path
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        mount(source, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if writable else MS_RDONLY))
    os.makedirs(root + view.cwd, exist_ok=True)
    os.chdir(root)
    os.chroot(root)
    os.chdir(view.cwd)
    _close_folders()
    os.environ.update(TMPDIR="/tmp", USER=USER, LOGNAME=USER, TORCHINDUCTOR_CACHE_DIR=f"{view.cache}/inductor",
                      TRITON_CACHE_DIR=f"{view.cache}/triton", TRITON_HOME=view.cache)
    tempfile.tempdir = None
    try:  # past the chroot there is no way back to partial isolation: drop everything or stop
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
        os.setgroups([])
        os.setresgid(GID, GID, GID)
        os.setresuid(view.uid, view.uid, view.uid)  # the capabilities go with uid 0
    except OSError as e:
        raise SystemExit(f"moebench: the submission's process could not drop its privileges ({e})") from None
    os.umask(0o007)  # what it makes in the module's cache stays the group's to write
    if os.geteuid() != view.uid:
        raise SystemExit("moebench: the submission's process could not drop its privileges")


def _close_folders() -> None:
    """A folder descriptor opened before the chroot would lead back out of it."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass
