"""Inductor's checks of the vector instruction sets the CPU names, made once where the submissions' processes fork
from: sandbox.PRELOAD imports this module in the fork server (and only there: importing it is the checks). Inductor
checks each set with a compile and a Python process that loads what it built (~2.6 s for the ten checks of an AMX
Xeon, once a process); each process forked after them has their answers, where it would check again in its compile
step, every evaluation (sandbox._own_header_folder undoes what else they fixed in the server)."""

try:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()
except Exception:  # noqa: BLE001  the server survives only an ImportError of its own: each process then checks
    pass
