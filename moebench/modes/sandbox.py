"""The submission in its own process: the parent (the harness) keeps the reference, the expected logits, the clock,
the statistics and the records; the child imports the contestant module, builds the model, compiles it and runs
what the parent asks for over a private pipe, each call under the phase's time limit.

A crash, a hang past the limit or an exception inside the submission is a `SubmissionFault`: the evaluation fails
and is recorded, and the harness goes on. Errors the user can fix (a module that does not import, a class that
does not build) stay one-line `MoebenchError`s, as in one process.
"""

import contextlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from moebench.engine.parallel import every_value, shared_value
from moebench.errors import MoebenchError, SubmissionFault
from moebench.progress import PREFIX


# Messages are plain data: None, bools, numbers, strings, lists, tuples, dicts with string keys and tensors, sent as
# a JSON header followed by the tensors' bytes. Reading one builds nothing but those types (unpickling what the child
# sends could run the child's code in the harness) and costs ~20 µs, not torch.save's ~0.5 ms a message: the clock
# around a timed request measures the submission, not the pipe.
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
_TUPLE, _TENSOR = "\0tuple", "\0tensor"  # the keys that mark them (no dict of the messages has a key with a NUL)


def _encode(message) -> bytes:
    blobs = []

    def plain(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            return {_TENSOR: [str(t.dtype).removeprefix("torch."), list(t.shape)]}
        if isinstance(x, tuple):
            return {_TUPLE: [plain(v) for v in x]}
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, dict) and all(isinstance(k, str) and "\0" not in k for k in x):
            return {k: plain(v) for k, v in x.items()}
        raise TypeError(f"not plain data: {type(x).__name__}")

    head = json.dumps(plain(message)).encode()
    return b"".join([len(head).to_bytes(8, "little"), head, *blobs])


def _decode(data: bytes):
    """The message `_encode` wrote; anything else raises (ValueError, KeyError, TypeError)."""
    n = int.from_bytes(data[:8], "little")
    offset = 8 + n

    def built(x):
        nonlocal offset
        if isinstance(x, list):
            return [built(v) for v in x]
        if not isinstance(x, dict):
            return x
        if _TUPLE in x:
            (items,) = x.values()
            return tuple(built(v) for v in items)
        if _TENSOR in x:
            ((dtype, shape),) = x.values()
            dtype, shape = _DTYPES[dtype], [int(d) for d in shape]
            size = torch.Size(shape).numel() * dtype.itemsize
            if min(shape, default=0) < 0 or offset + size > len(data):
                raise ValueError("a tensor's bytes are missing")
            raw = torch.frombuffer(bytearray(data[offset:offset + size]), dtype=torch.uint8) if size else \
                torch.empty(0, dtype=torch.uint8)
            offset += size
            return raw.view(dtype).reshape(shape)
        return {k: built(v) for k, v in x.items()}

    if len(data) < 8 or len(data) < 8 + n:
        raise ValueError("a truncated message")
    message = built(json.loads(data[8:8 + n]))
    if offset != len(data):
        raise ValueError("bytes after the message")
    return message


def _send(conn, message) -> None:
    conn.send_bytes(_encode(message))


def _receive(conn):
    return _decode(conn.recv_bytes())


# ---- the child ----

class _LiveProgress(io.TextIOBase):
    """A stderr that sends the progress lines (moebench.progress) to the parent as they are printed, for it to show
    while it waits, and writes the rest to `rest`."""

    def __init__(self, conn, rest):
        super().__init__()
        self.conn, self.rest, self.line = conn, rest, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.line += s
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            if line.startswith(PREFIX):
                _send(self.conn, (PROGRESS, line + "\n"))
            else:
                self.rest.write(line + "\n")
        return len(s)


@contextlib.contextmanager
def _progress_sent(conn):
    """While the child loads and compiles: its progress lines go to the parent at once; the rest of its stderr to
    the stderr it had (which _captured keeps for the reply)."""
    live = _LiveProgress(conn, sys.stderr)
    try:
        with contextlib.redirect_stderr(live):
            yield
    finally:
        live.rest.write(live.line)


def _captured(fn, *args):
    """fn(*args) with what it prints kept for the parent, which prints it in order with its own output."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001  everything goes back to the parent
        result = _failure(e)
    return (*result[:2], out.getvalue(), err.getvalue(), *result[2:])


def _replied(conn, reply) -> bool:
    """Sends the parent a reply; False where it has gone (interrupted, say: its end of the pipe closed)."""
    try:
        _send(conn, reply)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


DRIVER_FILES = ("/dev/nvidia",)  # the GPU driver's: kept open (_close_inherited)


def _close_inherited(conn) -> None:
    """Closes every descriptor but the standard ones and the pipe to the parent: the resource tracker's (through which
    a confined child could have the harness's tracker unlink shared memory as root) and the fork server's liveness
    pipe (a byte written there stops the server, and with it the harness's view of whether this process lives).
    The GPU driver's stay, should it have started before (asking whether CUDA is there starts it; moebench's import
    does not ask where the harness's environment says, which is what keeps the driver's other descriptors, if any,
    out of this)."""
    from multiprocessing import forkserver, resource_tracker

    keep = {0, 1, 2, conn.fileno()}
    for fd in map(int, os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ()):
        if fd in keep:
            continue
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(DRIVER_FILES):
                os.close(fd)
        except OSError:  # the listing's own descriptor, already gone
            pass
    resource_tracker._resource_tracker._fd = None  # one of the child's own, should it ever need one
    forkserver._forkserver._forkserver_alive_fd = None


def _own_header_folder() -> None:
    """The fork server imported Inductor's codecache (PRELOAD), which fixed the folder of its precompiled C++ headers
    there, in the server's user's default cache folder: this process takes its own user's, where the headers are kept
    from one evaluation to the next (a confined process's is the module's cache folder, bound there), not built again
    in each (~7 s)."""
    codecache = sys.modules.get("torch._inductor.codecache")
    if codecache is not None and hasattr(codecache, "_HEADER_DIR"):
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        codecache._HEADER_DIR = os.path.join(default_cache_dir(), "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")


def _child_main(conn, run, request: bytes, cwd: str, env: dict, extend: bool, view, group) -> None:
    """Enters its confinement (where there is one), builds the submission (UnderTest) and serves the parent's calls
    until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the terminal's process group: the harness stops us
    _close_inherited(conn)
    os.environ.clear()  # the parent's environment now, not the fork server's from when it started
    os.environ.update(env)
    os.chdir(cwd)
    partial = ""
    if view is not None:
        from moebench.modes.confine import enter

        try:
            enter(view)
        except OSError as e:  # no mount namespaces here (a container without CAP_SYS_ADMIN, say)
            partial = f"the kernel refused a private view of the filesystem ({e}), so the submission runs as " \
                      "this same user and could read this user's files"
    _own_header_folder()
    if group is not None:  # --tp-degree N: the N submission processes form their own group, apart from the ranks'
        from datetime import timedelta

        from torch import distributed as dist

        from moebench.modes.setup import device_of

        rank, world, port = group
        backend = "gloo"
        if device_of(run).type == "cuda":  # torchrun's ranks: this process's GPU is its rank's
            backend = "nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=run.phase_time_limit))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=run.phase_time_limit))
    from moebench.evaluation.benchmark import answer_request
    from moebench.evaluation.submission import load_submission
    from moebench.modes.compiled import described_graphs
    from moebench.modes.contest import UnderTest
    from moebench.modes.setup import Request, device_of, dtype_of, open_source

    req = Request(*_decode(request))
    built = []

    def load():  # first reply: the module imported (a broken one fails at once, before the parent's long work)
        with _progress_sent(conn):
            built.append(load_submission(run.qwen))
        return {"module": str(built[0].path), "partial": partial, "uid": os.getuid()}

    def build():  # second: the model built and compiled (meanwhile, on the CPU, the parent computes its reference)
        with _progress_sent(conn):
            built.append(UnderTest(run, built[0], open_source(run), device_of(run), dtype_of(run), req, extend=extend))
        return {"compile": built[1].artifacts.summary()}

    for step in (load, build):
        reply = _captured(step)
        if not _replied(conn, reply) or reply[0] != "ok":
            return
    under = built[1]

    def request(ids, mask, new_tokens):
        return answer_request(under.engine, ids, mask, new_tokens)

    handlers = {"greedy": lambda ids, mask, n: under.engine.greedy(ids, mask, n),
                "request": request,
                "graphs": lambda: described_graphs(under.artifacts, under.model, under.engine, req, run.seq_len, run)}
    while True:
        try:
            cmd, args = _receive(conn)
        except EOFError:
            return
        if cmd == "stop" or not _replied(conn, _captured(handlers[cmd], *args)):
            return


def _failure(e: BaseException) -> tuple:
    if isinstance(e, MoebenchError):
        return "user", str(e)
    line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return "fault", line, traceback.format_exc()


# ---- the parent's side ----

# What the submission's process imports before it reads the submission: the fork server imports it once, and then
# moebench.modes.fork_server (the checks of the CPU's vector sets, the C++ CPU operators). Inductor's compile_fx
# too, which the compile step imports (~1.1 s).
PRELOAD = ("moebench.modes.sandbox", "moebench.modes.confine", "moebench.modes.contest", "moebench.modes.setup",
           "moebench.evaluation.benchmark", "moebench.evaluation.submission", "moebench.modes.fork_server",
           "torch._inductor.compile_fx")


def _start_method():
    """Where the submission's process comes from. Spawned, each one starts a fresh interpreter that imports torch,
    Dynamo, Inductor and moebench anew: ~3.5 s on 2 cores, for every prompt of evaluate_all and every process of a
    test suite. Without CUDA a fork server pays that once: a fresh interpreter too, started (spawned) the first time
    it is needed, holding nothing of the harness's (no reference, no expected logits), which imports PRELOAD and
    then forks each submission process from itself. With CUDA, spawn: importing moebench initialises the CUDA
    driver, which a forked process cannot use. Spawn too where the server would listen on an abstract socket, which
    any process in the network namespace reaches (Pythons before 3.10.9 and 3.11.1: CVE-2022-42919); elsewhere its
    socket is a file only the harness's user can open, outside a confined child's view."""
    from multiprocessing import connection

    if torch.cuda.is_available() or connection.arbitrary_address("AF_UNIX").startswith("\0"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    _start_fork_server()
    return ctx


def _start_fork_server() -> None:
    """Starts the fork server unless it runs, on the harness's own moebench. The server is a `python -c` process,
    whose import path starts with its working folder (Python 3.11's fork server drops the path it is handed; each
    process it forks takes the harness's, but after the server has imported PRELOAD): a `moebench` folder there
    (another checkout's) stood in for the harness's in every submission process. It starts with PYTHONSAFEPATH (no
    working folder first) and, for a moebench not installed in a site folder, the folder holding it on PYTHONPATH."""
    import site
    from multiprocessing import forkserver

    folder = str(Path(__file__).parents[2])
    own = [] if folder in {*site.getsitepackages(), site.getusersitepackages()} else [folder]
    with _SERVER_START:  # (the environment is the process's: one start at a time)
        saved = {name: os.environ.get(name) for name in ("PYTHONSAFEPATH", "PYTHONPATH")}
        os.environ["PYTHONSAFEPATH"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join([*own, *filter(None, [saved["PYTHONPATH"]])])
        try:
            forkserver.ensure_running()
        except OSError:  # the submission's process, starting, meets it again and says so
            pass
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_SERVER_START = threading.Lock()


class Sandbox:
    """The child process holding the submission. It starts by loading the module (`started`: the first reply) and
    then builds and compiles (`compiled()`: the second), both within `time_limit` seconds of its start. `call(phase,
    cmd, *args)` then sends one request and waits at most `time_limit` seconds for its answer."""

    def __init__(self, run, req, time_limit: float, extend: bool = False, view=None, group=None):
        self.time_limit = time_limit
        ctx = _start_method()
        self.conn, child_conn = ctx.Pipe()
        # The request as bytes: a tensor among a process's arguments goes to shared memory, which the child could
        # then write into the harness's own request (the prompts the reference and the timed runs use).
        request = _encode((req.input_ids, req.attention_mask, req.max_new_tokens, req.min_new_tokens, req.pad_id,
                           req.eos_ids))
        self.process = ctx.Process(target=_child_main,
                                   args=(child_conn, run, request, os.getcwd(), dict(os.environ),
                                         extend, view, group),
                                   name="moebench-submission")
        try:
            self.process.start()
        except (OSError, EOFError) as e:  # the fork server gone, say
            raise SubmissionFault(f"the submission's process could not start ({type(e).__name__}: {e})") from None
        child_conn.close()  # only the child holds its end: a dead child reads as EOF here
        self.deadline = time.monotonic() + time_limit  # of the load and the compile together
        try:
            self.started = self._answer("load and compile", self.deadline)
        except BaseException:  # Ctrl-C, say: the caller never gets this object to stop the process
            self.kill()
            raise

    def compiled(self, grace: float = 0.0):
        """The second reply: the model built and compiled. grace: seconds the harness's own work took meanwhile
        (added to the limit: that work shared the CPU with the compile, and kept the harness from reading)."""
        return self._answer("load and compile", self.deadline + grace)

    def call(self, phase: str, cmd: str, *args):
        try:
            _send(self.conn, (cmd, args))
        except (BrokenPipeError, OSError):
            self._died(phase)
        return self._answer(phase)

    def _answer(self, phase: str, deadline: float | None = None):
        """The reply to the last call, or to the start (given its `deadline`: then progress lines may come first,
        each printed as it comes, one line of at most 300 characters, the deadline holding between them)."""
        progress = deadline is not None
        deadline = time.monotonic() + self.time_limit if deadline is None else deadline
        while True:
            reply = self._message(phase, deadline)
            if not (progress and isinstance(reply, tuple) and len(reply) == 2 and reply[0] == PROGRESS
                    and isinstance(reply[1], str)):
                break
            line = (reply[1].splitlines() or [""])[0][:300].rstrip()
            print(line, file=sys.stderr, flush=True)  # the child's compile, say, as it goes
        if not (isinstance(reply, tuple) and len(reply) in (4, 5) and reply[0] in ("ok", "user", "fault")
                and all(isinstance(x, str) for x in reply[1 if reply[0] != "ok" else 2:])):
            self.kill()
            raise SubmissionFault(f"the submission's process sent a malformed reply during {phase}")
        kind, value, out, err = reply[:4]
        print(out, end="")
        print(err, end="", file=sys.stderr)
        if kind == "ok":
            return value
        if kind == "user":
            self.kill()
            raise MoebenchError(value)
        print(reply[4], file=sys.stderr, end="")  # the submission's own traceback, for its author
        self.kill()
        raise SubmissionFault(f"the submission failed during {phase}: {value}")

    def _message(self, phase: str, deadline: float):
        if time.monotonic() > deadline or not self.conn.poll(max(0.0, deadline - time.monotonic())):
            self.kill()
            raise SubmissionFault(f"the submission did not finish {phase} within the time limit of "
                                  f"{self.time_limit:g} s (--phase-time-limit); it was stopped")
        try:
            return _receive(self.conn)
        except (EOFError, OSError):
            self._died(phase)
        except Exception as e:  # noqa: BLE001  anything but plain data is refused by weights_only
            self.kill()
            raise SubmissionFault(f"the submission's process sent something other than data during {phase} "
                                  f"({type(e).__name__})") from None

    def _died(self, phase: str):
        self.process.join(5)
        code = self.process.exitcode
        self.kill()
        raise SubmissionFault(f"the submission's process died during {phase} (exit code {code})")

    def stop(self, wait: float = 10) -> None:
        """Asks the process to end and waits `wait` seconds before killing it: ending by itself it runs its
        finalizers (a killed one leaves the semaphores it made, tqdm's lock say, for its resource tracker to
        report on the harness's stderr)."""
        if self.process.is_alive():
            try:
                _send(self.conn, ("stop", ()))
            except OSError:
                pass
            self.process.join(wait)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def isolates(run) -> bool:
    return run.isolation != "none"


def submission_of(run):
    """The contestant module: only located when it will run isolated (never imported here), else imported."""
    from moebench.evaluation.submission import load_submission, locate_submission

    return locate_submission(run.qwen) if isolates(run) else load_submission(run.qwen)


def isolation(run) -> bool:
    """Whether this run isolates the submission (--isolation process, one process per rank); says so when not."""
    if run.isolation == "none":
        print("isolation: none (--isolation none): the submission runs in the harness's own process")
        return False
    return True


def _timed_reply(reply, batch: int, new_tokens: int, vocab: int):
    """A timed request's answer, (tokens [batch, new_tokens] of the vocabulary, the submission's own timings), or a
    SubmissionFault: fewer tokens than asked for would be timed, scored and spot-checked as the whole request."""
    try:
        tokens, inner = reply
        steps = torch.as_tensor(inner["steps"], dtype=torch.float64)
        ttft, context = float(inner["ttft"]), float(inner["context"])
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, IndexError) as e:
        raise SubmissionFault(f"the submission's process sent a malformed answer to a timed request "
                              f"({type(e).__name__}: {e})") from None
    if not (isinstance(tokens, torch.Tensor) and tokens.shape == (batch, new_tokens)
            and tokens.dtype in (torch.int64, torch.int32)
            and (tokens.numel() == 0 or 0 <= int(tokens.min()) <= int(tokens.max()) < vocab)):
        what = f"a tensor of shape {list(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, torch.Tensor) else \
            type(tokens).__name__
        raise SubmissionFault(f"a timed request asked for {new_tokens} new tokens of {batch} prompt"
                              f"{'s' * (batch != 1)}, and the submission's process answered {what} (token ids "
                              f"[{batch}, {new_tokens}] below {vocab} expected)")
    if steps.shape != (new_tokens - 1,):
        raise SubmissionFault(f"the submission's process sent a malformed answer to a timed request (the times of "
                              f"{new_tokens - 1} decode steps expected, not of shape {list(steps.shape)})")
    return tokens, {"ttft": ttft, "context": context, "steps": steps.tolist()}


def while_compiling(under, device, work):
    """work() (the reference's expected logits, its compiled engine), on the CPU while an isolated submission's
    process builds and compiles its model (the 2 cores share the two; the compile is not timed), on a GPU after it,
    so that the compile (its kernels' autotuning, say) has the GPU to itself. The compile's time limit is extended
    by work()'s time. The submission is compiled when it returns, on every rank (a checkpoint, before the
    reference's collectives on a GPU)."""
    if not isinstance(under, IsolatedSubmission):  # --isolation none: built in this process already
        return work()
    if device.type != "cpu":
        under.compiled()
        shared_value(None, "the submission built")  # (before the reference's collectives: agreed_failure)
        return work()
    start = time.monotonic()
    value = work()
    under.compiled(grace=time.monotonic() - start)
    shared_value(None, "the submission built")
    return value


PROGRESS = "progress"  # a message of the child's before its reply: a progress line to print now
MALFORMED_START = "the submission's process sent a malformed reply during load and compile"


class IsolatedSubmission:
    """UnderTest's interface (validate, benchmark, kernel_flops) with the submission in a Sandbox: the parent draws
    the fresh prompts, holds the clock, and afterwards checks every timed output against the reference."""

    def __init__(self, run, source, req, extend: bool = False):
        import hashlib

        from moebench.engine.artifacts import make_folder
        from moebench.evaluation.submission import locate_submission
        from moebench.modes import confine

        self.run, self.source = run, source
        module = locate_submission(run.qwen).path
        self.artifacts = Path(run.compiled_model_path)
        folders = [f for f in (source.weights_dir, source.tokenizer.folder) if f is not None]
        self.rank, group, self.store = 0, None, None
        if run.tp_degree > 1:  # each rank's submission process joins a group of their own, on a port rank 0 picks
            from torch import distributed as dist

            self.rank = dist.get_rank()
            if self.rank == 0:
                self.store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
            port = shared_value(self.store.port if self.store else None, "the submissions' group's port")
            group = (self.rank, run.tp_degree, port)
        self.view, partial = confine.plan(run, module, hashlib.sha256(module.read_bytes()).hexdigest(), folders,
                                          self.artifacts, run.skip_compile, network=run.tp_degree > 1)
        self.box = None
        try:
            if not run.skip_compile:
                make_folder(self.artifacts)  # in one line, before a process starts, what publish would stumble on
            if self.view is not None and extend:
                confine.stage_from(self.view, self.artifacts, self.rank)
            self.box = Sandbox(run, req, run.phase_time_limit, extend, self.view, group)
            started = self.box.started
            if not (isinstance(started, dict) and isinstance(started.get("partial"), str)
                    and type(started.get("uid")) is int):
                raise SubmissionFault(MALFORMED_START)
        except BaseException:
            if self.box is not None:  # a process left running would hold the harness's exit
                self.box.kill()
            confine.discard(self.view)
            raise
        # the child could not enter its view (the kernel refused): it runs as the harness's user, not the view's
        self.confined = self.view is not None and not started["partial"]
        partial = partial or started["partial"]
        where = f"in its own process (pid {self.box.process.pid})" if run.tp_degree == 1 else \
            f"in a process of its own per rank ({run.tp_degree}, joined by their own gloo group)"
        if partial:
            print(f"isolation: the submission runs {where}; the clock, the reference, the expected logits and the "
                  f"records stay in the harness's. Partial: {partial}; its timed outputs are checked on fresh "
                  "prompts instead")
        else:
            print(f"isolation: the submission runs {where} as user {self.box.started['uid']} ({confine.USER}), in "
                  "a private view of the filesystem (the model, its module, moebench, Python; not the expected "
                  "logits, the records or this user's files), " + ("with no network" if run.tp_degree == 1 else
                                                                    "with the host's loopback for its ranks' group")
                  + "; the clock, the reference and the records stay in the harness's")
        self.compile = None
        self.outputs, self.audit, self.flops, self.eos_ids = [], None, None, ()

    def compiled(self, grace: float = 0.0) -> None:
        """Waits for the model's build and compile, which the submission's process goes on with once its module is
        loaded (what the harness does meanwhile is the caller's: while_compiling); the calls below wait for it
        first."""
        from moebench.modes import confine

        if self.compile is not None:
            return
        reply = self.box.compiled(grace)
        if not (isinstance(reply, dict) and isinstance(reply.get("compile"), dict)):
            self.box.kill()
            raise SubmissionFault(MALFORMED_START)
        confine.publish(self.view, self.artifacts, self.rank)  # where a compile in one process puts it
        self.compile = reply["compile"]

    def validate(self, expected, req, tokenizer):
        from moebench.modes.contest import validate_submission

        self.compiled()
        return validate_submission(self.run, lambda ids, mask, n: self.box.call("validation", "greedy", ids, mask, n),
                                   expected, req, tokenizer)

    def benchmark(self, req, reference=None) -> dict:
        """benchmark_report.json's content. reference: the reference's request (contest.reference_request), timed
        alternating with the submission on the same prompts; its report is the "reference" section."""
        from moebench.evaluation.benchmark import benchmark_report
        from moebench.evaluation.checked import banned_tokens, checked_benchmark, private_seed
        from moebench.modes.contest import progress

        self.compiled()
        run = self.run
        banned = banned_tokens(req, self.source.tokenizer)
        bar = progress(run.benchmark_runs, "benchmark submission" + " and reference, in turn" * bool(reference))
        seed = private_seed()
        vocab = self.source.config.vocab_size

        def request(ids, mask, n):
            return _timed_reply(self.box.call("benchmark", "request", ids, mask, n), ids.shape[0], n, vocab)

        self.eos_ids = tuple(req.eos_ids)  # the spot check bans them, as the timed requests did
        timings, self.outputs, self.audit, ref = checked_benchmark(
            request, req.input_ids, req.attention_mask, req.max_new_tokens, run.benchmark_runs, run.warmup_runs,
            run.audit_pairs, vocab, banned, seed, on_run=lambda i: bar.update(), reference=reference,
            pause=self._paused_on_every_rank)
        bar.close()
        shape = req.input_ids.shape[1], req.max_new_tokens, req.input_ids.shape[0]
        report = benchmark_report(timings, *shape)
        report["measured_by"] = {"e2e_model": "the harness's process, around each whole request (scored)",
                                 "context_encoding_model": "the submission's process (informational)",
                                 "token_generation_model": "the submission's process (informational)"}
        report["inputs"] = {"fresh_prompts": True, "seed": seed}
        if ref is not None:  # timed by the same clock around the same work, but the pipe (~0.3-0.5 ms on 2 vCPUs)
            report["reference"] = benchmark_report(ref, *shape)
        return report

    def kernel_flops(self, req) -> dict:
        """The child describes its graphs; the harness counts them here, by its own formulas and bucket rules (the
        child could change any count made in its own process)."""
        from moebench.modes.compiled import request_flops

        self.compiled()
        self.flops = request_flops(self.run, req, self.box.call("the FLOP count", "graphs")), req
        return self.flops[0]

    def paused(self):
        """While the harness times the reference: the submission's processes stopped (confine.paused)."""
        from moebench.modes import confine

        return confine.paused(self.view if self.confined else None, self.box.process.pid)

    @contextlib.contextmanager
    def _paused_on_every_rank(self):
        """paused() with the ranks in step: no rank's clock starts before every rank's submission is stopped, or
        after only some were continued (each rank's helper takes its own time)."""
        with self.paused():
            shared_value(None, "every rank's submission paused")
            yield
        shared_value(None, "every rank's submission continued")

    def finish(self, device, dtype) -> dict:
        """Stops the submission's process, then checks every timed output with the reference (built now, so that
        the two models never hold the device's memory together) and reads the caching audit."""
        from moebench.engine.generator import Engine
        from moebench.evaluation.accuracy import DEFAULT_FAILED_FRACTION
        from moebench.evaluation.checked import spot_check
        from moebench.evaluation.flops import credibility, request_macs
        from moebench.model.loader import build_model
        from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
        from moebench.modes.contest import divergence_tol
        from moebench.modes.parallel import parallelize
        from moebench.modes.setup import buckets_of

        self.box.stop()
        checks = {"caching_audit": self.audit.report() if self.audit else None}
        if self.outputs or self.flops:
            ref = build_model(Qwen3MoeForCausalLM, self.source, ModelOptions(), dtype, device)
        if self.outputs:
            engine = Engine(ref, batch=1, max_len=self.run.seq_len, banned=self.eos_ids)
            checks["spot_check"] = spot_check(engine, self.outputs, divergence_tol(self.run),
                                              DEFAULT_FAILED_FRACTION[self.run.torch_dtype])
        if self.flops:
            flops, req = self.flops
            ref = parallelize(ref, self.run)  # (the spot check above ran it whole) sharded as the submission is
            counted, _ = request_macs(ref, req.input_ids, req.attention_mask, req.max_new_tokens, self.run.seq_len,
                                      **buckets_of(self.run))
            macs = [flops["total_macs"], flops["kernel_macs"], counted.total.total]
            # a rank's graphs hold its shard of the work: the ranks' counts summed
            macs = [sum(counts) for counts in zip(*every_value(macs, "the MAC counts"))]
            checks["mac_count"] = credibility({"total_macs": macs[0], "kernel_macs": macs[1]}, macs[2],
                                              self.run.tp_degree)
        return checks

    def close(self) -> None:
        from moebench.modes.confine import discard

        self.box.stop(wait=2)  # idle here, it ends at once; busy (interrupted, say), it is killed
        discard(self.view)
