"""Several processes on one job: who does what, and how the results meet.

Every stage runs as one process by default. Started through `accelerate launch` (or
`personas train --gpus N`, which re-launches itself that way), training runs data-parallel
and compose/evaluate split their items between the processes; only the main process
writes the final files. Nothing here touches accelerate's process state unless the job
really has several processes, so a plain run is exactly what it was.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable, Sequence, TypeVar

from personas.errors import GroupshotError

T = TypeVar("T")


def launched() -> bool:
    """Started by a multi-process launcher (accelerate launch, torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> Any:
    """accelerate's PartialState for this process (joins the process group on first call).

    Made here, and first, on purpose: on a machine without CUDA, a bare `PartialState()`
    (cpu=False) does not see the other processes and every one would think it is alone.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    return process_state().num_processes if launched() else 1


def is_main_process() -> bool:
    return process_state().is_main_process if launched() else True


def process_device() -> str | None:
    """This process's device under a launcher (cuda:<local rank>, or cpu); None when alone,
    so that the stage picks its own default."""
    if not launched():
        return None
    device = process_state().device
    return "cpu" if device.type == "cpu" else str(device)


def my_share(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of `items` (all of them when alone): accelerate's
    `PartialState().split_between_processes`, so rank 0 takes the first share, and so on."""
    if not launched():
        return list(items)
    with process_state().split_between_processes(list(items)) as mine:
        return list(mine)


def gather_items(items: Sequence[T]) -> list[T]:
    """Every process's `items` (picklable), concatenated in process order, on every process.

    With `my_share` this gives back the original order.
    """
    if not launched():
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def run_on_main(fn: Callable[[], T]) -> T:
    """`fn()` on the main process only; every process gets its result, or its error.

    A GroupshotError on the main process is raised again, with the same message, on every
    process, so that none waits forever for a main process that has stopped.
    """
    if not launched():
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    crash: BaseException | None = None
    if process_state().is_main_process:
        try:
            box[0] = ("ok", fn())
        except GroupshotError as e:
            box[0] = ("error", str(e))
        except BaseException as e:  # a bug: the others stop too, the main process shows the traceback
            box[0] = ("crash", f"{type(e).__name__}: {e}")
            crash = e
    broadcast_object_list(box, from_process=0)
    if crash is not None:
        raise crash
    kind, value = box[0]
    if kind == "error":
        raise GroupshotError(value)
    if kind == "crash":
        raise RuntimeError(f"the main process failed: {value}")
    return value


def free_port() -> int:
    """A TCP port free right now on this host, for the launcher's rendezvous (the default
    29500 would collide with a second launch on the same machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, argv: Sequence[str], processes: int, *, port: int | None = None) -> list[str]:
    """`accelerate launch` running `python -m module argv...` in `processes` processes on this machine.

    `--multi_gpu` starts them through torch.distributed.run; on a machine without CUDA the
    processes join a gloo (CPU) group instead (accelerate's `--cpu` flag would start only
    one process unless MPI is installed).
    """
    if processes < 2:
        raise ValueError(f"launch_command needs 2 or more processes, got {processes}")
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port or free_port()), "-m", module, *argv,
    ]


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (a re-launched command must not re-launch)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
