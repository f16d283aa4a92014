"""The local backend: every subnet of a round trained one after another in this process.

Usage::

    from istfx.backends import LocalBackend
    result = LocalBackend().run_round(ist, round, train_subnet)

Useful for development, tests and single-machine runs; it moves the same
bytes a distributed backend would send (``result.bytes_per_subnet``), only
without sending them.
"""
from __future__ import annotations

import time

from istfx.core.compiler import ISTModel
from istfx.runtime.backend_api import (
    Backend,
    RoundResult,
    TrainSubnet,
    model_device,
    subnet_bytes,
    subnet_parameters,
)


class LocalBackend(Backend):
    """Trains the subnets of a round sequentially in the calling process.

    ``RoundResult.extra["subnet_seconds"]`` holds each subnet's training
    time, so callers can tell what S workers side by side would have taken
    (the round's time minus their sum plus their maximum).

    Args:
        on_nonfinite: passed to :meth:`ISTModel.reassemble`: ``"skip"``
            (default) leaves out and reports subnets with NaN/Inf values,
            ``"raise"`` stops the run.
    """

    name = "local"

    def __init__(self, on_nonfinite: str = "skip") -> None:
        self.on_nonfinite = on_nonfinite

    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Decompose, train each subnet with `train_subnet`, reassemble weighted by samples."""
        start = time.perf_counter()
        subnets = ist.decompose(round)
        parameters = [subnet_parameters(s) for s in subnets]
        sizes = [subnet_bytes(s) for s in subnets]
        results, seconds = [], []
        for index, subnet in enumerate(subnets):
            begin = time.perf_counter()
            results.append(train_subnet(index, subnet))
            seconds.append(time.perf_counter() - begin)
        home = model_device(ist.model)
        subnets = [s.to(home) for s in subnets]
        report = ist.reassemble(
            subnets, weights=[max(r.samples, 1) for r in results], on_nonfinite=self.on_nonfinite
        )
        return RoundResult(
            round=round,
            results=results,
            report=report,
            parameters_per_subnet=parameters,
            bytes_per_subnet=sizes,
            seconds=time.perf_counter() - start,
            extra={"subnet_seconds": seconds},
        )
