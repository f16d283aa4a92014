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
from istfx.runtime.optim_state import attach, trained_names
from istfx.runtime.state_travel import CentralState, StateConfig


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

    def __init__(self, on_nonfinite: str = "skip", state: StateConfig | None = None) -> None:
        self.on_nonfinite = on_nonfinite
        self.state_config = state or StateConfig()
        self._central: CentralState | None = None

    def configure_state(self, config: StateConfig) -> None:
        """Carry optimizer state and/or take the outer step from the next round on (kept in this process)."""
        self.state_config = config
        self._central = None

    def run_round(self, ist: ISTModel, round: int, train_subnet: TrainSubnet) -> RoundResult:
        """Decompose, train each subnet with `train_subnet`, reassemble weighted by samples."""
        start = time.perf_counter()
        subnets = ist.decompose(round)
        central = None
        if not self.state_config.plain:
            if self._central is None:
                self._central = CentralState(ist, self.state_config)
            central = self._central
            slices = ist.slices(round)  # the assignment decompose(round) used
            central.begin(ist)
            for index, subnet in enumerate(subnets):
                attach(subnet, central.for_subnet(slices, index, trained_names(subnet)))
        parameters = [subnet_parameters(s) for s in subnets]
        sizes = [subnet_bytes(s) for s in subnets]
        results, seconds = [], []
        for index, subnet in enumerate(subnets):
            begin = time.perf_counter()
            results.append(train_subnet(index, subnet))
            seconds.append(time.perf_counter() - begin)
        home = model_device(ist.model)
        subnets = [s.to(home) for s in subnets]
        weights = [max(r.samples, 1) for r in results]
        report = ist.reassemble(subnets, weights=weights, on_nonfinite=self.on_nonfinite)
        if central is not None:
            accepted = report.accepted
            central.finish(ist, slices, {s: results[s].optimizer_state for s in accepted},
                           {s: trained_names(subnets[s]) for s in accepted}, {s: weights[s] for s in accepted})
        return RoundResult(
            round=round,
            results=results,
            report=report,
            parameters_per_subnet=parameters,
            bytes_per_subnet=sizes,
            seconds=time.perf_counter() - start,
            extra={"subnet_seconds": seconds},
        )
