"""``istfx.training.fit``: whole IST training runs, round after round.

Usage::

    from istfx.training import fit

    ist = istfx.compile(model, subnets=4)
    history = fit(ist, train_loader, rounds=50, local_steps=10,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                  eval_data=test_loader, metrics_path="metrics.jsonl")
    history[-1]["eval_accuracy"]

Each round the backend cuts the model into subnets, every subnet takes
``local_steps`` optimizer steps on batches from its own iterator over
``train_data``, and the trained subnets are written back into ``ist.model``
(weighted by the samples each saw). Evaluation runs on the full model.

Optimizer state is reset every round by default (a new optimizer per subnet
per round, as in the IST paper). With ``carry_optimizer_state=True`` a
full-size copy of every per-parameter state tensor (SGD momentum, Adam
moments, ...) is kept: each round it is cut like the parameters
(:meth:`RoundSlices.take`) and loaded into the subnets' new optimizers, then
written back (:meth:`RoundSlices.put`) after training.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .compiler import ISTModel
from .errors import ISTError
from .slicing import RoundSlices

if TYPE_CHECKING:
    from istfx.backends import SubnetResult

__all__ = ["History", "evaluate", "fit"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


class History(list):
    """Per-round metrics of a :func:`fit` run: a list of dicts, one per round.

    Keys: ``round``, ``train_loss``, ``train_accuracy``, ``eval_loss``,
    ``eval_accuracy`` (None on rounds without evaluation), ``samples`` (this
    round, all subnets), ``samples_total``, ``epochs`` (``samples_total`` over
    the dataset size, None when unknown), ``seconds``,
    ``parameters_per_subnet``, ``bytes_per_subnet``, ``rejected`` (subnets
    whose non-finite update was refused) and ``rejected_reasons``.
    ``history.reports`` holds each round's :class:`ReassembleReport`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reports: list = []

    def metric(self, key: str) -> list:
        """One metric across rounds, e.g. ``history.metric("eval_accuracy")``."""
        return [row.get(key) for row in self]

    @property
    def last(self) -> dict:
        """The last round's metrics."""
        if not self:
            raise IndexError("the history is empty")
        return self[-1]


# -- batches -------------------------------------------------------------------
def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ISTError(
        f"each batch must be a pair (inputs, targets), got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
        "wrap your data so that iterating it yields (inputs, targets)."
    )


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _batch_size(inputs: Any, targets: Any) -> int:
    for value in (targets, inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, (tuple, list)) and value:
            return _batch_size(value[0], None)
        if isinstance(value, dict) and value:
            return _batch_size(next(iter(value.values())), None)
    return 1


def _correct(outputs: Any, targets: Any) -> int | None:
    """Correct predictions when outputs are [N, C] logits and targets [N] class indices."""
    if (
        isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
        and outputs.dim() == 2 and targets.dim() == 1 and outputs.shape[0] == targets.shape[0]
        and not targets.is_floating_point() and not targets.is_complex()
    ):
        return int((outputs.argmax(dim=1) == targets).sum())
    return None


class _Batches:
    """An endless iterator over `data`, restarted when exhausted."""

    def __init__(self, data: Iterable) -> None:
        self.data = data
        self.iterator: Iterator | None = None
        self.epoch = 0

    def next(self) -> Any:
        if self.iterator is not None:
            try:
                return next(self.iterator)
            except StopIteration:
                pass
        self.iterator = iter(self.data)
        self.epoch += 1
        try:
            return next(self.iterator)
        except StopIteration:
            raise ISTError(
                "train_data yielded no batches"
                + (" after its first pass" if self.epoch > 1 else "")
                + ": pass a non-empty, re-iterable collection of (inputs, targets) batches, "
                "such as a DataLoader or a list (a generator cannot be restarted)."
            ) from None


# -- evaluation -----------------------------------------------------------------
def evaluate(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    device: torch.device | str | None = None,
) -> dict[str, float | None]:
    """Mean loss and accuracy of `model` on `data`, in eval mode and without gradients.

    `loss_fn` must return the batch mean. Accuracy is None unless outputs are
    ``[N, C]`` logits and targets ``[N]`` class indices. The model's training
    mode is restored afterwards.

    Returns:
        ``{"loss": ..., "accuracy": ..., "samples": ...}``.
    """
    from istfx.backends import model_device

    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, samples, counted = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for batch in data:
                inputs, targets = _split_batch(batch)
                inputs, targets = _to(inputs, device), _to(targets, device)
                outputs = _call(model, inputs)
                n = _batch_size(inputs, targets)
                loss_sum += float(loss_fn(outputs, targets)) * n
                samples += n
                c = _correct(outputs, targets)
                if c is not None:
                    correct += c
                    counted += n
    finally:
        model.train(was_training)
    if samples == 0:
        raise ISTError("eval_data yielded no batches: pass a non-empty DataLoader or list of (inputs, targets).")
    return {
        "loss": loss_sum / samples,
        "accuracy": correct / counted if counted else None,
        "samples": samples,
    }


# -- optimizer state --------------------------------------------------------------
def _named_parameters(ist: ISTModel, subnet: nn.Module) -> dict[str, nn.Parameter]:
    """Captured parameter name -> the subnet's parameter (tied parameters under their captured name)."""
    kinds = ist.plan.state_kinds
    out: dict[str, nn.Parameter] = {}
    by_id: dict[int, str] = {}
    for name, param in subnet.named_parameters(remove_duplicate=False):
        if name in kinds:
            out[name] = param
            by_id[id(param)] = name
    for name, param in subnet.named_parameters():
        if id(param) not in by_id:
            out[name] = param
    return out


class _OptimizerState:
    """Full-size optimizer state kept between rounds, keyed by parameter name.

    Tensors shaped like their parameter are cut and written back like the
    parameter itself (momentum, Adam moments); scalars (Adam's ``step``) are
    kept as the maximum over subnets. Other entries are not carried.
    """

    def __init__(self, ist: ISTModel) -> None:
        self.ist = ist
        self.full: dict[str, dict[str, torch.Tensor]] = {}  # name -> key -> full-size tensor
        self.scalars: dict[str, dict[str, Any]] = {}  # name -> key -> max over subnets
        self.dropped: set[str] = set()

    def for_subnet(self, slices: RoundSlices, subnet: int) -> dict[str, dict[str, Any]]:
        """The slice of the state subnet `subnet` holds in the round of `slices`."""
        out: dict[str, dict[str, Any]] = {}
        for name in set(self.full) | set(self.scalars):
            entry: dict[str, Any] = {}
            for key, full in self.full.get(name, {}).items():
                entry[key] = slices.take(name, full, subnet)
            for key, value in self.scalars.get(name, {}).items():
                entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
            out[name] = entry
        return out

    def write_back(self, slices: RoundSlices, states: list[tuple[int, dict[str, dict[str, Any]], float]]) -> None:
        """Write subnets' trained state back: ``states`` holds (subnet, state, weight)."""
        shapes = self.ist.plan.state_shapes
        parts: dict[tuple[str, str], list[tuple[int, torch.Tensor, float]]] = {}
        for subnet, state, weight in states:
            for name, entry in state.items():
                if name not in shapes:
                    continue
                held = tuple(len(i) if i is not None else size
                             for size, i in zip(shapes[name], slices.indices[subnet][name]))
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and tuple(value.shape) == held and len(held) > 0:
                        parts.setdefault((name, key), []).append((subnet, value.detach(), weight))
                    elif not isinstance(value, torch.Tensor) or value.numel() == 1:
                        scalars = self.scalars.setdefault(name, {})
                        old = scalars.get(key)
                        if old is None or _greater(value, old):
                            scalars[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
                    else:
                        self.dropped.add(f"{name}[{key!r}]")
        home = self.ist.state_tensor
        with torch.no_grad():
            for (name, key), values in parts.items():
                entries = self.full.setdefault(name, {})
                if key not in entries:
                    param = home(name)
                    entries[key] = torch.zeros(shapes[name], dtype=values[0][1].dtype, device=param.device)
                full = entries[key]
                slices.put(name, full, [(s, v.to(full.device), w) for s, v, w in values])


def _greater(a: Any, b: Any) -> bool:
    try:
        return bool(a > b)
    except (TypeError, RuntimeError):
        return False


# -- the local-training closure -------------------------------------------------
class _SubnetTrainer:
    """Trains one subnet for `local_steps` steps; the same for every backend."""

    def __init__(
        self,
        ist: ISTModel,
        train_data: Iterable,
        local_steps: int,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        device: torch.device | None,
        carry: bool,
    ) -> None:
        self.ist = ist
        self.batches = [_Batches(train_data) for _ in range(ist.plan.subnets)]
        self.local_steps = local_steps
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.carry = carry
        self.initial_state: list[dict[str, dict[str, Any]]] | None = None  # per subnet, set each round

    def __call__(self, index: int, subnet: nn.Module) -> SubnetResult:
        from istfx.backends import SubnetResult

        if self.device is not None:
            subnet.to(self.device)
        named = _named_parameters(self.ist, subnet)
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        optimizer = self.optimizer(list(trainable.values()))
        if self.carry and self.initial_state is not None:
            for name, entry in self.initial_state[index].items():
                if name in trainable and entry:
                    param = trainable[name]
                    optimizer.state[param] = {  # scalars such as Adam's step stay where they were
                        k: v.to(param.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                        for k, v in entry.items()
                    }
        loss_sum, correct, counted, samples = 0.0, 0, 0, 0
        for _ in range(self.local_steps):
            inputs, targets = _split_batch(self.batches[index].next())
            inputs, targets = _to(inputs, self.device), _to(targets, self.device)
            outputs = _call(subnet, inputs)
            loss = self.loss_fn(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = _batch_size(inputs, targets)
            loss_sum += float(loss.detach()) * n
            samples += n
            c = _correct(outputs.detach() if isinstance(outputs, torch.Tensor) else outputs, targets)
            if c is not None:
                correct += c
                counted += n
        state = None
        if self.carry:
            state = {}
            for name, param in trainable.items():
                entry = optimizer.state.get(param)
                if entry:
                    state[name] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        return SubnetResult(
            samples=samples,
            loss_sum=loss_sum,
            correct=correct if counted == samples and samples else None,
            steps=self.local_steps,
            optimizer_state=state,
        )


# -- fit ------------------------------------------------------------------------
def _dataset_size(train_data: Any) -> int | None:
    dataset = getattr(train_data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fit(
    ist: ISTModel,
    train_data: Iterable,
    *,
    rounds: int,
    local_steps: int,
    optimizer: OptimizerFactory = lambda params: torch.optim.SGD(params, lr=0.01),
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    eval_data: Iterable | None = None,
    eval_every: int = 1,
    backend: Any = "local",
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    carry_optimizer_state: bool = False,
    device: torch.device | str | None = None,
) -> History:
    """Train ``ist.model`` with Independent Subnet Training.

    Args:
        ist: the compiled model (:func:`istfx.compile`).
        train_data: re-iterable batches ``(inputs, targets)``, e.g. a
            DataLoader. ``inputs`` is a tensor, a tuple of positional
            arguments or a dict of keyword arguments. Every subnet has its own
            iterator, restarted when exhausted.
        rounds: IST rounds (decompose, train, reassemble).
        local_steps: optimizer steps each subnet takes per round.
        optimizer: ``params -> torch.optim.Optimizer``; called once per subnet
            per round (SGD lr 0.01 by default, as in the IST paper).
        loss_fn: ``loss_fn(outputs, targets)``, the mean over the batch.
        eval_data: batches to evaluate the full model on, every
            ``eval_every`` rounds and after the last round (under
            :meth:`ISTModel.inference_scaling`, so models whose residual
            blocks are dealt out are evaluated with their branches scaled).
        eval_every: rounds between evaluations.
        backend: ``"local"`` or a backend object (see :mod:`istfx.backends`).
        metrics_path: if given, each round's metrics are appended to this
            file as one JSON line.
        progress: show a tqdm progress bar (only on a terminal).
        carry_optimizer_state: keep per-parameter optimizer state (momentum,
            Adam moments) across rounds, cut and written back like the
            parameters; by default each round starts a fresh optimizer.
        device: where subnets train (default: the model's device); the model
            itself stays where it is and is evaluated there.

    Returns:
        A :class:`History` with one dict of metrics per round. ``ist.model``
        holds the trained weights; when residual blocks were dealt out, call
        ``ist.finalize()`` once training is over to fold the evaluation
        scaling into it.
    """
    from istfx.backends import get_backend

    if not isinstance(ist, ISTModel):
        raise ISTError(f"fit expects the ISTModel returned by istfx.compile(model, subnets=...), got "
                       f"{type(ist).__name__}.")
    for label, value in (("rounds", rounds), ("local_steps", local_steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ISTError(f"{label} must be an int >= 1, got {value!r}.")
    if train_data is None or not hasattr(train_data, "__iter__"):
        raise ISTError(f"train_data must be an iterable of (inputs, targets) batches such as a DataLoader, "
                       f"got {type(train_data).__name__}.")
    try:
        empty = len(train_data) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = False
    if empty:
        raise ISTError("train_data is empty: pass a DataLoader or list with at least one (inputs, targets) batch "
                       "(check the dataset, and drop_last with a batch size larger than the dataset).")
    if not callable(optimizer):
        raise ISTError("optimizer must be a function params -> torch.optim.Optimizer, e.g. "
                       "lambda params: torch.optim.SGD(params, lr=0.01).")
    runner = get_backend(backend)
    device = torch.device(device) if device is not None else None

    trainer = _SubnetTrainer(ist, train_data, local_steps, optimizer, loss_fn, device, carry_optimizer_state)
    opt_state = _OptimizerState(ist) if carry_optimizer_state else None
    dataset_size = _dataset_size(train_data)
    history = History()
    samples_total = 0

    from tqdm.auto import tqdm

    show = progress and sys.stderr.isatty()
    bar = tqdm(range(rounds), desc="IST rounds", unit="round", disable=not show, leave=True)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        metrics_file = (stack.enter_context(open(metrics_path, "a", encoding="utf-8"))
                        if metrics_path is not None else None)
        for round in bar:
            start = time.perf_counter()
            slices = None
            if opt_state is not None:
                slices = ist.slices(round)  # the same assignment decompose(round) uses
                trainer.initial_state = [opt_state.for_subnet(slices, s) for s in range(ist.plan.subnets)]
            result = runner.run_round(ist, round, trainer)
            if opt_state is not None:
                accepted = set(result.report.accepted)
                opt_state.write_back(slices, [
                    (s, r.optimizer_state, float(max(r.samples, 1)))
                    for s, r in enumerate(result.results) if s in accepted and r.optimizer_state
                ])
            samples_total += result.samples
            row: dict[str, Any] = {
                "round": round,
                "train_loss": result.loss,
                "train_accuracy": result.accuracy,
                "eval_loss": None,
                "eval_accuracy": None,
                "samples": result.samples,
                "samples_total": samples_total,
                "epochs": samples_total / dataset_size if dataset_size else None,
            }
            if eval_data is not None and ((round + 1) % eval_every == 0 or round == rounds - 1):
                with ist.inference_scaling():  # ResIST branch scaling, when blocks are dealt out
                    scores = evaluate(ist.model, eval_data, loss_fn)
                row["eval_loss"], row["eval_accuracy"] = scores["loss"], scores["accuracy"]
            row.update({
                "seconds": time.perf_counter() - start,
                "parameters_per_subnet": list(result.parameters_per_subnet),
                "bytes_per_subnet": list(result.bytes_per_subnet),
                "rejected": sorted(result.report.rejected),
                "rejected_reasons": {int(k): v for k, v in sorted(result.report.rejected.items())},
            })
            history.append(row)
            history.reports.append(result.report)
            if metrics_file is not None:
                metrics_file.write(json.dumps(_json_safe(row)) + "\n")
                metrics_file.flush()
            bar.set_postfix_str(
                f"loss {_fmt(row['train_loss'], '.4f')} acc {_fmt(row['train_accuracy'], '.3f')}"
                + (f" eval {_fmt(row['eval_accuracy'], '.3f')}" if row["eval_loss"] is not None else "")
            )
    return history
