"""Test-only fault injection for llama-run, in every process whose PYTHONPATH holds this folder
(Python imports sitecustomize at start-up, so spawned ranks get it too).

LLAMAFUSE_FAULT="RANK:POINT:HOW" makes global rank RANK fail
  POINT: load (instead of loading its rank file), batch (at its second batch), end (after the last collective)
  HOW:   raise (ZeroDivisionError), error (LlamafuseError on that rank only), exit0 / exit3 (os._exit), kill (SIGKILL)
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

    if point == "load":
        wrap("open_model", before=True)
    elif point == "batch":
        wrap("score_batch", nth=2)
    elif point == "end":
        wrap("score_items", after=True)
    else:
        raise ValueError(f"LLAMAFUSE_FAULT: unknown point {point!r}")
