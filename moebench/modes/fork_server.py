"""What the fork server that the submissions' processes fork from does once for all of them: sandbox.PRELOAD
imports this module there, and only there (importing it is the work). Each process forked after it has:
- Inductor's checks of the vector instruction sets the CPU names: a compile and a Python process that loads what it
  built, for each (~2.6 s for the ten checks of an AMX Xeon, once a process), which its compile step made again,
  every evaluation (sandbox._own_header_folder undoes what else they fixed in the server);
- moebench's C++ CPU operators (moebench.model.cpu_ops), loaded from the harness's own cache, where each
  confined process built them again in its module's cache (~26 s on 2 cores, for every new version of a module).
The server survives only an ImportError of its own: where either fails, each process does it itself."""

try:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()
except Exception:  # noqa: BLE001
    pass

try:
    from moebench.model import cpu_ops

    cpu_ops.load()
except Exception:  # noqa: BLE001
    pass
