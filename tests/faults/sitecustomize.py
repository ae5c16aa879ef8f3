"""Test-only fault injection, in every process whose PYTHONPATH holds this folder (Python
imports sitecustomize at start-up, so llama-run's spawned ranks get it too).

LLAMAFUSE_FAULT="RANK:POINT:HOW" makes llama-run's global rank RANK fail
  POINT: init (before joining the process group), load (instead of loading its rank file), batch (at its second batch), end (after the last collective)
  HOW:   raise (ZeroDivisionError), error (LlamafuseError on that rank only), exit0 / exit3 (os._exit), kill (SIGKILL)
LLAMAFUSE_SLOW_WRITE=SECONDS makes llama-convert sleep that long before writing each tensor.
"""
import os

if os.environ.get("LLAMAFUSE_FAULT"):
    import signal

    import torch.distributed as dist

    import llamafuse.runtime.evaluate as evaluate
    from llamafuse.formats import LlamafuseError

    rank, point, how = os.environ["LLAMAFUSE_FAULT"].split(":")

    def fail():
        if how == "raise":
            return 1 / 0
        if how == "error":
            raise LlamafuseError(f"injected error on rank {rank}")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(how.removeprefix("exit")))

    def wrap(name, before=False, after=False, nth=0):
        real, calls = getattr(evaluate, name), [0]

        def patched(*args, **kwargs):
            here = dist.is_initialized() and dist.get_rank() == int(rank)
            calls[0] += 1
            if here and (before or calls[0] == nth):
                fail()
            out = real(*args, **kwargs)
            if here and after:
                fail()
            return out
        setattr(evaluate, name, patched)

    if point == "init":  # before the process group exists: the rank is a keyword argument
        real_init = dist.init_process_group

        def init_process_group(*args, **kwargs):
            if kwargs.get("rank") == int(rank):
                fail()
            return real_init(*args, **kwargs)
        dist.init_process_group = init_process_group
    elif point == "load":
        wrap("load_rank", before=True)
    elif point == "batch":
        wrap("score_batch", nth=2)
    elif point == "end":
        wrap("score_groups", after=True)
    else:
        raise ValueError(f"LLAMAFUSE_FAULT: unknown point {point!r}")

if os.environ.get("LLAMAFUSE_SLOW_WRITE"):
    import time

    import llamafuse.convert.write as write

    def slow_write_tensor(f, t, _real=write.write_tensor, _pause=float(os.environ["LLAMAFUSE_SLOW_WRITE"])):
        time.sleep(_pause)
        return _real(f, t)
    write.write_tensor = slow_write_tensor
