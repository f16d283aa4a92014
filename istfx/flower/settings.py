"""The settings of one federated run, as Flower's run config carries them to the ServerApp and ClientApps.

Flower hands every app the run config of ``[tool.flwr.app.config]`` (or
``flwr run --run-config``): flat TOML scalars. :class:`FederatedSettings`
reads and writes that form; nested values (the ``istfx.compile`` options,
the optimizer) travel as JSON strings.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from istfx.errors import ISTError

__all__ = ["STRATEGIES", "FederatedSettings"]

STRATEGIES = ("ist", "fedavg")


@dataclass
class FederatedSettings:
    """One federated run: model file, strategy, rounds, local training, data partition, outputs.

    Attributes:
        model: the model file (absolute, or relative to the app folder).
        strategy: ``"ist"`` (subnets) or ``"fedavg"`` (Flower's FedAvg, full model on every client).
        compile: ``istfx.compile`` keyword arguments (``subnets``, ``policy``, ``sizes``, ``seed``...).
        rounds: server rounds.
        clients: clients the server waits for before the first round.
        participation: fraction of the clients sampled each round.
        local_steps, batch_size: local training per round.
        optimizer: :class:`istfx.runtime.optimizers.TrainingRecipe` fields.
        dirichlet: ``None`` for IID partitions, else the Dirichlet alpha.
        seed: seed of the model, the partition, the sampling and the batches.
        round_timeout: seconds the server waits for a round's replies.
        data: ``"auto"`` (the file's ``train_data``/``eval_data``, else digits) or ``"digits"``.
        metrics: JSONL file the server appends one row per round to (None: none).
        save: safetensors file the server writes the final model to (None: none).
        threads: torch threads per process (0: torch's default).
    """

    model: str
    strategy: str = "ist"
    compile: dict[str, Any] = field(default_factory=lambda: {"subnets": 4})
    rounds: int = 3
    clients: int = 2
    participation: float = 1.0
    local_steps: int = 10
    batch_size: int = 32
    optimizer: dict[str, Any] = field(default_factory=lambda: {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9})
    dirichlet: float | None = None
    seed: int = 0
    round_timeout: float = 600.0
    data: str = "auto"
    metrics: str | None = None
    save: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ISTError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}.")
        for name in ("rounds", "clients", "local_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ISTError(f"{name} must be an int >= 1, got {value!r}.")
        if not (isinstance(self.participation, (int, float)) and 0 < self.participation <= 1):
            raise ISTError(f"participation must be in (0, 1], got {self.participation!r}.")
        if self.dirichlet is not None and not (math.isfinite(self.dirichlet) and self.dirichlet > 0):
            raise ISTError(f"dirichlet alpha must be > 0 (or None for IID), got {self.dirichlet!r}.")
        if not (self.round_timeout > 0):
            raise ISTError(f"round_timeout must be > 0 seconds, got {self.round_timeout!r}.")
        if self.data not in ("auto", "digits"):
            raise ISTError(f"data must be 'auto' or 'digits', got {self.data!r}.")

    @property
    def subnets(self) -> int:
        """S: the subnets per round (1 for FedAvg, which sends the full model)."""
        return int(self.compile.get("subnets", 1)) if self.strategy == "ist" else 1

    def model_path(self, app_dir: str | Path | None = None) -> Path:
        """The model file, a relative path taken from `app_dir` (the Flower app's folder)."""
        path = Path(self.model)
        if not path.is_absolute() and app_dir is not None:
            path = Path(app_dir) / path
        return path

    def to_run_config(self) -> dict[str, Any]:
        """The settings as flat TOML scalars (``[tool.flwr.app.config]``)."""
        data = asdict(self)
        data["compile"] = json.dumps(self.compile, sort_keys=True)
        data["optimizer"] = json.dumps(self.optimizer, sort_keys=True)
        data["dirichlet"] = "iid" if self.dirichlet is None else repr(float(self.dirichlet))
        data["metrics"] = self.metrics or ""
        data["save"] = self.save or ""
        return {k.replace("_", "-"): v for k, v in data.items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> "FederatedSettings":
        """Read the run config written by :meth:`to_run_config` (unknown keys are refused)."""
        data = {str(k).replace("-", "_"): v for k, v in dict(config).items()}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ISTError(f"unknown run-config keys {unknown}: known keys are "
                           f"{sorted(k.replace('_', '-') for k in known)}.")
        if "model" not in data:
            raise ISTError("the run config needs `model` (the model file).")
        try:
            for key in ("compile", "optimizer"):
                if isinstance(data.get(key), str):
                    data[key] = json.loads(data[key])
        except json.JSONDecodeError as exc:
            raise ISTError(f"run-config `{key}` is not valid JSON: {exc}") from None
        alpha = data.get("dirichlet")
        if isinstance(alpha, str):
            data["dirichlet"] = None if alpha.strip().lower() in ("", "iid", "none") else float(alpha)
        for key in ("metrics", "save"):
            if data.get(key) == "":
                data[key] = None
        for key in ("participation", "round_timeout"):
            if isinstance(data.get(key), int):
                data[key] = float(data[key])
        return cls(**data)
