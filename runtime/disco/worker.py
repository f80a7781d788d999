"""Entry point of a Disco worker process (workers 1..N-1 of `nccl_session(kind="process")`).

TVM's own entry point (`tvm.exec.disco_worker`) would run without Kiln's NCCL backend and, with
a runtime-only TVM, without Disco's C++ half and the CUDA runtime; this one loads them first.
"""

import contextlib

from kiln.runtime.device import open_device
from kiln.runtime.disco.nccl import load_nccl
from kiln.runtime.errors import KilnError


def main() -> None:
    # TVM's CUDA runtime first (as in nccl_session); nccl_session has checked the GPUs in the
    # controller already, and a worker without one can still run host functions.
    with contextlib.suppress(KilnError):
        open_device("cuda:0")
    load_nccl()
    from tvm.exec import disco_worker

    disco_worker.main()


if __name__ == "__main__":
    main()
