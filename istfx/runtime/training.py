"""``istfx.runtime.training.fit``: whole IST training runs, round after round.

Usage::

    from istfx.runtime.training import fit

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
per round, as in the IST paper). With ``optimizer_state="carry"`` the
per-parameter state (SGD momentum, Adam moments, ...) travels with its units
on every backend (:mod:`istfx.runtime.optim_state`): the backend hands each
subnet its slice of the state, the subnet's new optimizer starts from it, and
the trained state comes back with the trained parameters. ``outer_lr`` /
``outer_momentum`` take DiLoCo's outer Nesterov step on each round's change
(:mod:`istfx.runtime.outer`); ``lr_schedule`` and ``clip_grad_norm`` act
before every optimizer step (:mod:`istfx.runtime.optimizers`).

With a distributed backend (``backend="torch"`` or a
:class:`istfx.backends.TorchDistBackend`) every rank calls ``fit`` with the
same arguments; each trains its own subnet slot, and rank 0 evaluates, logs
and writes the metrics. ``train_data`` may then be a function
``subnet -> iterable`` so each rank builds only its own shard.
``checkpoint_dir``/``checkpoint_every`` save safetensors checkpoints
(:mod:`istfx.runtime.checkpoint`) and ``resume=True`` continues from the newest one
on the same trajectory: same assignments, data positions and RNG states.

Everything ``fit`` asks of a backend is a method of
:class:`istfx.runtime.backend_api.Backend` (with defaults for a backend that
trains every subnet in this process); ``fit`` calls those methods and nothing
else. Each metrics row also sets IST's bytes next to data parallel and local
SGD for the same samples (:func:`istfx.runtime.comm.byte_comparison`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from istfx.core.compiler import ISTModel
from istfx.core.slicing import RoundSlices
from istfx.errors import ISTError
from istfx.runtime import optim_state
from istfx.runtime.optimizers import StepControl
from istfx.runtime.state_travel import StateConfig
from istfx.runtime import checkpoint as ckpt
from istfx.runtime.data import IGNORE_INDEX
from istfx.runtime import comm
from istfx.runtime.backend_api import (
    Backend,
    OptimizerStep,
    RoundResult,
    StepperFactory,
    SubnetResult,
    call_model,
    model_device,
    model_parameter_bytes,
    resolve_backend,
)

__all__ = ["History", "OptimizerStep", "call_model", "evaluate", "fit"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


class History(list):
    """Per-round metrics of a :func:`fit` run: a list of dicts, one per round.

    Keys: ``round``, ``train_loss``, ``train_accuracy``, ``eval_loss``,
    ``eval_accuracy`` (None on rounds without evaluation), ``samples`` (this
    round, all subnets), ``samples_total``, ``epochs`` (``samples_total`` over
    the dataset size, None when unknown), ``seconds``,
    ``parameters_per_subnet``, ``bytes_per_subnet``, ``rejected`` (subnets
    whose non-finite update was refused) and ``rejected_reasons``; the byte
    comparison ``ddp_bytes_per_rank``, ``local_sgd_bytes_per_rank``,
    ``model_parameter_bytes`` and ``world_size``
    (:func:`istfx.runtime.comm.byte_comparison`); then the backend's own
    measurements (``RoundResult.extra``: bytes sent and received per rank, ...).
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


def _batch_size(inputs: Any, targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point():
        return int((targets != IGNORE_INDEX).sum())
    for value in (targets, inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, (tuple, list)) and value:
            return _batch_size(value[0], None)
        if isinstance(value, dict) and value:
            return _batch_size(next(iter(value.values())), None)
    return 1


def _correct(outputs: Any, targets: Any) -> int | None:
    """Correct predictions when outputs are [N, C] logits and targets [N] class indices (ignore_index skipped)."""
    if (
        isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
        and outputs.dim() == 2 and targets.dim() == 1 and outputs.shape[0] == targets.shape[0]
        and not targets.is_floating_point() and not targets.is_complex()
    ):
        return int(((outputs.argmax(dim=1) == targets) & (targets != IGNORE_INDEX)).sum())
    return None


class _Batches:
    """An endless iterator over `data`, restarted when exhausted.

    `data` may also be a function returning the iterable (called on first
    use), so ranks only build the data of the subnets they train.
    ``consumed`` counts the batches handed out (the position a resumed run
    fast-forwards to).
    """

    def __init__(self, data: Iterable | Callable[[], Iterable]) -> None:
        self.data = data
        self.iterator: Iterator | None = None
        self.epoch = 0
        self.consumed = 0

    def next(self) -> Any:
        if callable(self.data) and not hasattr(self.data, "__iter__"):
            self.data = self.data()
        batch = self._next()
        self.consumed += 1
        return batch

    def _next(self) -> Any:
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
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, samples, counted = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for batch in data:
                inputs, targets = _split_batch(batch)
                inputs, targets = _to(inputs, device), _to(targets, device)
                outputs = call_model(model, inputs)
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


class _OptimizerState(optim_state.FullState):
    """Full-size optimizer state over `ist`'s tensors (:class:`istfx.runtime.optim_state.FullState`)."""

    def __init__(self, ist: ISTModel) -> None:
        super().__init__(ist.plan.state_shapes)


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
        make_stepper: StepperFactory = OptimizerStep,
        draws: int = 1,
        control: StepControl | None = None,
    ) -> None:
        self.ist = ist
        self.make_stepper = make_stepper
        self.draws = draws
        if _per_subnet(train_data):
            self.batches = [_Batches(lambda s=s: train_data(s)) for s in range(ist.plan.subnets)]
        else:
            self.batches = [_Batches(train_data) for _ in range(ist.plan.subnets)]
        self.local_steps = local_steps
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.carry = carry
        self.control = control or StepControl()

    def positions(self, slots: Iterable[int]) -> dict[str, int]:
        """Batches each of `slots` has drawn so far (saved in checkpoints)."""
        return {str(s): self.batches[s].consumed for s in slots}

    def fast_forward(self, positions: dict[str, int], slots: list[int]) -> None:
        """Draw (and drop) batches until each slot is back at its saved position.

        Batches are drawn round by round in slot order, ``local_steps`` at a
        time, as training drew them, so data sources that share a generator
        (one DataLoader for every subnet) replay the same order.
        """
        chunk = self.local_steps * self.draws
        left = {s: int(positions.get(str(s), 0)) for s in slots}
        while any(left.values()):
            for s in slots:
                for _ in range(min(chunk, left[s])):
                    self.batches[s].next()
                left[s] -= min(chunk, left[s])

    def __call__(self, index: int, subnet: nn.Module) -> SubnetResult:
        if self.device is not None:
            subnet.to(self.device)
        named = _named_parameters(self.ist, subnet)
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        optimizer = self.optimizer(list(trainable.values()))
        carried = optim_state.attached(subnet)  # the backend hands over the state the subnet's units carry
        if self.carry and carried:
            optim_state.load_into(optimizer, trainable, carried)
        first_step = self.batches[index].consumed // self.draws
        stepper = self.control.wrap(self.make_stepper(subnet, optimizer), optimizer, first_step)
        loss_sum, correct, counted, samples = 0.0, 0, 0, 0
        for _ in range(self.local_steps):
            for draw in range(self.draws):
                batch = self.batches[index].next()  # every rank draws every batch: the streams stay aligned
                if not stepper.computes(draw):
                    continue
                inputs, targets = _split_batch(batch)
                inputs, targets = _to(inputs, self.device), _to(targets, self.device)
                outputs = stepper.forward(inputs)
                loss = self.loss_fn(outputs, targets)
                stepper.backward(loss)
                n = _batch_size(inputs, targets)
                loss_sum += float(loss.detach()) * n
                samples += n
                c = _correct(outputs.detach() if isinstance(outputs, torch.Tensor) else outputs, targets)
                if c is not None:
                    correct += c
                    counted += n
            stepper.step()
        stepper.finish()
        state = optim_state.extract(optimizer, trainable) if self.carry else None
        return SubnetResult(
            samples=samples,
            loss_sum=loss_sum,
            correct=correct if counted == samples and samples else None,
            steps=self.local_steps,
            optimizer_state=state,
        )


# -- fit ------------------------------------------------------------------------
def _per_subnet(train_data: Any) -> bool:
    """True when `train_data` is a function ``subnet -> iterable`` (each subnet its own data)."""
    return callable(train_data) and not hasattr(train_data, "__iter__")


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
    train_data: Iterable | Callable[[int], Iterable],
    *,
    rounds: int,
    local_steps: int,
    optimizer: OptimizerFactory = lambda params: torch.optim.SGD(params, lr=0.01),
    loss_fn: LossFn = torch.nn.functional.cross_entropy,
    eval_data: Iterable | None = None,
    eval_every: int = 1,
    backend: Backend | str = "local",
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    carry_optimizer_state: bool = False,
    optimizer_state: str | None = None,
    outer_lr: float = 1.0,
    outer_momentum: float = 0.0,
    lr_schedule: Callable[[int], float] | None = None,
    clip_grad_norm: float | None = None,
    device: torch.device | str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool | str | os.PathLike = False,
    resume_if_present: bool = False,
    keep_checkpoints: int | None = 2,
    callback: Callable[[dict], None] | None = None,
) -> History:
    """Train ``ist.model`` with Independent Subnet Training.

    Args:
        ist: the compiled model (:func:`istfx.compile`).
        train_data: re-iterable batches ``(inputs, targets)``, e.g. a
            DataLoader. ``inputs`` is a tensor, a tuple of positional
            arguments or a dict of keyword arguments. Every subnet has its own
            iterator, restarted when exhausted. Or a function
            ``subnet -> iterable`` giving each subnet slot its own data (its
            shard); distributed ranks only call it for the slots they train.
        rounds: IST rounds (decompose, train, reassemble); with `resume`, the
            total including the rounds already done.
        local_steps: optimizer steps each subnet takes per round.
        optimizer: ``params -> torch.optim.Optimizer``; called once per subnet
            per round (SGD lr 0.01 by default, as in the IST paper).
        loss_fn: ``loss_fn(outputs, targets)``, the mean over the batch.
        eval_data: batches to evaluate the full model on, every
            ``eval_every`` rounds and after the last round (under
            :meth:`ISTModel.inference_scaling`, so models whose residual
            blocks are dealt out are evaluated with their branches scaled).
            With a distributed backend, pass it on every rank: evaluation
            may gather the model, which every rank takes part in; only the
            main rank evaluates.
        eval_every: rounds between evaluations.
        backend: ``"local"``, ``"torch"``, ``"deepspeed"`` or an instance of
            a :class:`~istfx.runtime.backend_api.Backend` subclass (see
            :mod:`istfx.backends`). With a distributed backend every rank
            calls ``fit``; the main rank (rank 0) evaluates, logs and writes
            the metrics.
        metrics_path: if given, each round's metrics are appended to this
            file as one JSON line.
        progress: show a tqdm progress bar (only on a terminal).
        carry_optimizer_state: the same as ``optimizer_state="carry"``.
        optimizer_state: ``"reset"`` (default: a fresh optimizer per subnet
            per round, as in the IST paper) or ``"carry"``: per-parameter
            optimizer state (momentum, Adam moments) travels with its units,
            cut and written back like the parameters
            (:mod:`istfx.runtime.optim_state`), on every backend.
        outer_lr, outer_momentum: DiLoCo's outer Nesterov step on each
            round's change (:mod:`istfx.runtime.outer`; e.g. 0.7 and 0.9);
            1 and 0 (default) is the plain write-back.
        lr_schedule: ``step -> multiplier`` of each optimizer group's
            learning rate before step ``step`` (counted per subnet slot over
            the whole run), e.g. ``TrainingRecipe(...).schedule(total)``
            (:mod:`istfx.runtime.optimizers`); None: constant.
        clip_grad_norm: clip each step's gradient (of the subnet's
            parameters) to this L2 norm; None: off.
        device: where subnets train (default: the model's device); the model
            itself stays where it is and is evaluated there.
        checkpoint_dir: where checkpoints go (:mod:`istfx.runtime.checkpoint`).
        checkpoint_every: save after every this many rounds (and after the
            last round); 0 saves nothing.
        resume: True to continue from the newest complete checkpoint in
            `checkpoint_dir`, or the path of a checkpoint; an error when there
            is none (see `resume_if_present`). The resumed run deals the same
            assignments and replays the data positions and RNG states, so it
            ends where an uninterrupted run would; `metrics_path` is cut back
            to the rounds before the checkpoint's next round.
        resume_if_present: with ``resume=True``, start from round 0 instead of
            failing when `checkpoint_dir` holds no complete checkpoint yet.
        keep_checkpoints: how many complete checkpoints to keep (None: all).
        callback: called on the main rank with each round's metrics row.

    Returns:
        A :class:`History` with one dict of metrics per round run. ``ist.model``
        holds the trained weights (on rank 0 with a distributed backend); when
        residual blocks were dealt out, call ``ist.finalize()`` once training
        is over to fold the evaluation scaling into it.
    """
    _check_arguments(ist, train_data, rounds=rounds, local_steps=local_steps, eval_every=eval_every,
                     optimizer=optimizer, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                     resume=resume, resume_if_present=resume_if_present)
    state_config = _state_config(carry_optimizer_state, optimizer_state, outer_lr, outer_momentum, lr_schedule,
                                 clip_grad_norm)
    runner = resolve_backend(backend)
    if (resume or resume_if_present) and not state_config.plain and not runner.checkpoints_carried_state:
        raise ISTError(f"resume: the {runner.name!r} backend's checkpoints do not hold the carried optimizer state "
                       "or the outer momentum, so a resumed run would leave its trajectory; resume with "
                       "optimizer_state='reset' and no outer step, start again, or use the torch backend's "
                       "sharded topology, whose checkpoints hold them.")
    runner.configure_state(state_config)  # raises for a backend that cannot keep it
    device = torch.device(device) if device is not None else None

    trainer = _SubnetTrainer(ist, train_data, local_steps, optimizer, loss_fn, device, state_config.carry,
                             make_stepper=runner.make_stepper, draws=runner.draws_per_step,
                             control=StepControl(lr_schedule, clip_grad_norm))
    dataset_size = None if _per_subnet(train_data) else _dataset_size(train_data)
    parameter_bytes = model_parameter_bytes(ist)  # before prepare: ranks may drop the model's storage
    history = History()
    start_round, samples_total = _prepare_and_resume(ist, runner, trainer, checkpoint_dir, resume,
                                                     resume_if_present)
    main = runner.is_main
    slots = runner.trained_slots(ist)
    manifest = {"subnets": ist.plan.subnets, "seed": ist.plan.seed, "backend": runner.name,
                "topology": runner.topology}

    from tqdm.auto import tqdm

    show = progress and main and sys.stderr.isatty()
    bar = tqdm(range(start_round, rounds), desc="IST rounds", unit="round", disable=not show, leave=True)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        log = _MetricsLog(stack, metrics_path if main else None, callback if main else None,
                          keep_before=start_round if resume else None)
        for round in bar:
            start = time.perf_counter()
            result = runner.run_round(ist, round, trainer)
            samples_total += result.samples
            scores = None
            if eval_data is not None and ((round + 1) % eval_every == 0 or round == rounds - 1):
                scores = _evaluate_full_model(runner, ist, eval_data, loss_fn)
            if checkpoint_dir is not None and checkpoint_every and (
                    (round + 1) % checkpoint_every == 0 or round == rounds - 1):
                runner.save_checkpoint(
                    ist, checkpoint_dir, round,
                    {"data_positions": trainer.positions(slots), "samples_total": samples_total},
                    {"samples_total": samples_total, **manifest}, keep_checkpoints)
            row = _round_metrics(result, samples_total=samples_total, dataset_size=dataset_size, scores=scores,
                                seconds=time.perf_counter() - start,
                                comparison=comm.byte_comparison(parameter_bytes, runner.ranks(ist), result.steps))
            history.append(row)
            history.reports.append(result.report)
            log.write(row)
            bar.set_postfix_str(
                f"loss {_fmt(row['train_loss'], '.4f')} acc {_fmt(row['train_accuracy'], '.3f')}"
                + (f" eval {_fmt(row['eval_accuracy'], '.3f')}" if row["eval_loss"] is not None else "")
            )
    runner.finish(ist)
    return history


def _state_config(carry_optimizer_state: bool, optimizer_state: str | None, outer_lr: float, outer_momentum: float,
                  lr_schedule: Any, clip_grad_norm: Any) -> StateConfig:
    """What the backend keeps between rounds, from :func:`fit`'s arguments (refusing bad ones)."""
    if carry_optimizer_state and optimizer_state not in (None, "carry"):
        raise ISTError(f"carry_optimizer_state=True and optimizer_state={optimizer_state!r} disagree: "
                       "pass optimizer_state only.")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ISTError(f"clip_grad_norm must be > 0 (or None: off), got {clip_grad_norm!r}.")
    if lr_schedule is not None and not callable(lr_schedule):
        raise ISTError("lr_schedule must be a function step -> learning-rate multiplier, e.g. "
                       "TrainingRecipe(lr_schedule='cosine').schedule(rounds * local_steps).")
    return StateConfig("carry" if carry_optimizer_state else (optimizer_state or "reset"), outer_lr, outer_momentum)


def _check_arguments(ist: Any, train_data: Any, *, rounds: Any, local_steps: Any, eval_every: Any, optimizer: Any,
                     checkpoint_dir: Any, checkpoint_every: Any, resume: Any,
                     resume_if_present: Any = False) -> None:
    """Refuse bad arguments of :func:`fit` before anything starts, saying what to pass instead."""
    if not isinstance(ist, ISTModel):
        raise ISTError(f"fit expects the ISTModel returned by istfx.compile(model, subnets=...), got "
                       f"{type(ist).__name__}.")
    for label, value in (("rounds", rounds), ("local_steps", local_steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ISTError(f"{label} must be an int >= 1, got {value!r}.")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ISTError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}.")
    if (checkpoint_every or resume is True) and checkpoint_dir is None:
        raise ISTError("checkpoint_every and resume=True need checkpoint_dir.")
    if resume_if_present and resume is not True:
        raise ISTError("resume_if_present goes with resume=True (resume from checkpoint_dir when it holds one).")
    if checkpoint_dir is not None:
        ckpt.check_root(checkpoint_dir)
    per_subnet = _per_subnet(train_data)
    if not per_subnet and (train_data is None or not hasattr(train_data, "__iter__")):
        raise ISTError(f"train_data must be an iterable of (inputs, targets) batches such as a DataLoader, "
                       f"or a function subnet -> iterable, got {type(train_data).__name__}.")
    try:
        empty = not per_subnet and len(train_data) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = False
    if empty:
        raise ISTError("train_data is empty: pass a DataLoader or list with at least one (inputs, targets) batch "
                       "(check the dataset, and drop_last with a batch size larger than the dataset).")
    if not callable(optimizer):
        raise ISTError("optimizer must be a function params -> torch.optim.Optimizer, e.g. "
                       "lambda params: torch.optim.SGD(params, lr=0.01).")


# -- resume -----------------------------------------------------------------------
def _prepare_and_resume(ist: ISTModel, runner: Backend, trainer: _SubnetTrainer,
                        checkpoint_dir: str | os.PathLike | None,
                        resume: bool | str | os.PathLike, resume_if_present: bool = False) -> tuple[int, int]:
    """Prepare `runner` for the first round to run; returns ``(start_round, samples_total)``.

    Without `resume` (or with `resume_if_present` and no checkpoint yet) that
    is round 0; `resume` without a checkpoint is an error naming where it
    looked. Resuming, the backend loads the newest complete checkpoint, and
    each slot this process trains replays its data stream to the saved
    position and gets its saved RNG state back, so the run continues on the
    uninterrupted trajectory.
    """
    checkpoint = None
    if resume:
        where = checkpoint_dir if resume is True else resume
        checkpoint = ckpt.resumable(where, if_present=resume_if_present)
    start_round, samples_total = 0, 0
    if checkpoint is not None:
        checkpoint.check(subnets=ist.plan.subnets, seed=ist.plan.seed)
        start_round = checkpoint.next_round
        samples_total = int(checkpoint.manifest.get("samples_total", 0))
    saved = runner.prepare(ist, start_round, checkpoint)
    if checkpoint is not None:
        slots = runner.trained_slots(ist)
        meta = saved[0] if saved is not None else {}
        positions = meta.get("data_positions") or {str(s): start_round * trainer.local_steps for s in slots}
        trainer.fast_forward(positions, slots)
        if saved is not None:
            ckpt.restore_rng(saved[1])
    return start_round, samples_total


# -- metrics ------------------------------------------------------------------------
def _evaluate_full_model(runner: Backend, ist: ISTModel, eval_data: Iterable,
                         loss_fn: LossFn) -> dict[str, float | None] | None:
    """Scores of the full model (on the main process; None elsewhere). Every process takes part."""
    with runner.full_model(ist) as model:
        if model is None:
            return None
        with ist.inference_scaling():  # ResIST branch scaling, when blocks are dealt out
            return evaluate(model, eval_data, loss_fn)


def _round_metrics(result: RoundResult, *, samples_total: int, dataset_size: int | None,
                  scores: dict[str, float | None] | None, seconds: float,
                  comparison: dict[str, float]) -> dict[str, Any]:
    """One round's metrics row (see :class:`History` for the keys).

    `scores` come from :func:`evaluate` (None: not evaluated this round),
    `comparison` from :func:`istfx.runtime.comm.byte_comparison`; the
    backend's ``result.extra`` measurements follow (the row's own keys win).
    """
    row: dict[str, Any] = {
        "round": result.round,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "eval_loss": None if scores is None else scores["loss"],
        "eval_accuracy": None if scores is None else scores["accuracy"],
        "samples": result.samples,
        "samples_total": samples_total,
        "epochs": samples_total / dataset_size if dataset_size else None,
        "seconds": seconds,
        "parameters_per_subnet": list(result.parameters_per_subnet),
        "bytes_per_subnet": list(result.bytes_per_subnet),
        "rejected": sorted(result.report.rejected),
        "rejected_reasons": {int(k): v for k, v in sorted(result.report.rejected.items())},
    }
    for key, value in result.extra.items():
        row.setdefault(key, value)
    for key, value in comparison.items():
        row.setdefault(key, value)
    return row


class _MetricsLog:
    """Where the main process sends each round's row: a JSON-lines file (appended) and a callback.

    With `keep_before` (a resumed run's first round) the file first loses the
    rows of that round and later, which the resumed run writes again.
    """

    def __init__(self, stack: contextlib.ExitStack, path: str | os.PathLike | None,
                 callback: Callable[[dict], None] | None, keep_before: int | None = None) -> None:
        if path is not None and keep_before is not None and os.path.isfile(path):
            _truncate_metrics(path, keep_before)
        self.file = stack.enter_context(open(path, "a", encoding="utf-8")) if path is not None else None
        self.callback = callback

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_json_safe(row)) + "\n")
            self.file.flush()
        if self.callback is not None:
            self.callback(row)


def _truncate_metrics(path: str | os.PathLike, keep_before: int) -> None:
    """Keep the rows of rounds before `keep_before` in the JSON-lines file `path` (atomically)."""
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                break  # a row cut short by the interruption: it and anything after it go
            if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] < keep_before:
                kept.append(line if line.endswith("\n") else line + "\n")
    ckpt.atomic_write_text(path, "".join(kept))
