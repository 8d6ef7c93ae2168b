"""What the fork server that the submissions' processes fork from does once for all of them: sandbox.PRELOAD
imports this module there, and only there (importing it is the work). Each process forked after it has:
- Inductor's checks of the vector instruction sets the CPU names: for each, a Python process that loads a test
  library (built first where Inductor's cache has none), ~2.6 s for the ten checks of an AMX Xeon, once a process,
  which its compile step made again, every evaluation;
- moebench's C++ CPU operators (moebench.model.cpu_ops), loaded from the harness's own cache, where each confined
  process built them again in its module's cache (~26 s on 2 cores, for every new version of a module).
Where the operators are not loaded (no compiler, MOEBENCH_CPU_OPS=0 when the server started), each process tries
again and says why itself; a set whose check failed stays failed for the server's life, as in any process. (Importing
Inductor's codecache here fixes one folder of the server's user's: sandbox._own_header_folder takes the process's.)
The server survives only an ImportError of its own: where either raises, each process does it itself."""

try:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()
except Exception:  # noqa: BLE001
    pass

try:
    from moebench.model import cpu_ops

    if not cpu_ops.load():
        cpu_ops.load.cache_clear()
except Exception:  # noqa: BLE001
    pass
