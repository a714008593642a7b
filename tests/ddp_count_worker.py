"""Counts the cockpit's collectives per tracked step of a two-process DDP run over gloo (tests/distributed/
test_collective_count.py, docs/distributed.md).

    python tests/ddp_count_worker.py RANK WORLD INIT_FILE LOGDIR PRESET   # PRESET: default, economy, full

Every quantity of PRESET runs on every step. ``torch.distributed``'s collectives are wrapped in this
process (the cockpit's ``Group`` calls them through the module), each call labelled with the phase it
belongs to (quantity and hook) and what it is: a header (the check before a payload), an end (a phase's
closing announcement) or a payload. Process 0 writes ``collectives.json`` beside the log: per step,
the list of [phase, kind, what]. DDP's own gradient reductions (its C++ reducer) are not counted.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402
from cockpit_lite import distributed as cdist  # noqa: E402
from cockpit_lite.presets import preset  # noqa: E402
from ddp_worker import batches, model  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_single",
               "broadcast", "reduce_scatter", "all_to_all", "barrier")
LOG: list = []  # [step, phase, kind, what]
_label = {"kind": "payload", "what": ""}
_state = {"group": None}


def _caller() -> str:
    """The cockpit function (outside distributed.py and the engine's bracket) that asked for it."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "cockpit_lite/" in path and not path.endswith(("distributed.py", "engine/calls.py")) \
                and "/distributed/" not in path:
            return f"{path.split('cockpit_lite/')[-1]}:{frame.name}"
    return ""


def _wrap_collectives() -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            group = _state["group"]
            if group is not None and kwargs.get("group") is group.group:
                LOG.append([group._phase[0], group._phase[1], _label["kind"], _label["what"] or _caller() or _name])
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _label_group() -> None:
    """Labels the collectives that ``Group`` makes (header/end/payload), whatever its internals."""
    init = cdist.Group.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _state["group"] = self

    cdist.Group.__init__ = __init__
    for method, kind in (("end", "end"), ("close", "end"), ("_announce", "header")):
        original = getattr(cdist.Group, method, None)
        if original is None:
            continue

        def labelled(self, *args, _original=original, _kind=kind, **kwargs):
            before = dict(_label)
            _label.update(kind=_kind, what=str(args[1]) if _kind == "header" and len(args) > 1 else "")
            try:
                return _original(self, *args, **kwargs)
            finally:
                _label.update(before)

        setattr(cdist.Group, method, labelled)


def run(rank: int, world: int, init_file: str, logdir: str, name: str) -> None:
    _wrap_collectives()
    _label_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    quantities = {q: s for q, s in preset(name, "every").items() if q != "time"}
    with cockpit_lite.watch(net, opt, loss_fn=loss_fn, logdir=logdir, quantities=quantities):
        for x, y in batches():
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()
    if rank == 0:
        with open(os.path.join(logdir, "collectives.json"), "w") as f:
            json.dump(LOG, f)
    del net, opt
    import gc

    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
