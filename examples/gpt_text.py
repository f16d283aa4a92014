"""A byte-level GPT on Python's own documentation, trained with IST and in full.

The text is ``pydoc_data.topics`` (the help() pages shipped with CPython,
about 470 kB), read as bytes: the vocabulary is the 256 byte values. The last
10% is held out for validation. The same GPT (``istfx.models.GPT``) is
trained three ways from the same initial weights:

- full-model training with AdamW;
- IST with S = 2 and S = 4 subnets (``istfx.fit``): attention heads and MLP
  units are dealt out every round, each subnet takes ``local_steps`` AdamW
  steps on its own batches, and the slices are written back.

Run (about 2 minutes on 2 cores)::

    python examples/gpt_text.py                  # --steps 300 --subnets 2 4
    python examples/gpt_text.py --steps 60       # a quick look
    python examples/gpt_text.py --weight-decay 0.1 --warmup-steps 30 --lr-schedule cosine --clip-grad-norm 1 \
        --optimizer-state carry --outer-lr 0.7 --outer-momentum 0.9

The optimizer is AdamW (betas 0.9, 0.99) with the flags' weight decay,
warm-up, schedule and clipping, the same for full training and for every
subnet; IST carries AdamW's moments with their units by default
(``--optimizer-state reset`` restarts them every round) and can take
DiLoCo's outer step on each round's change.

Each subnet takes as many optimizer steps on its own batches as the full
model does, so IST sees S times the data of full training; it also runs
S smaller models one after another here, where a cluster runs them side by
side. ``benchmarks/gpt_ist.py`` compares them at equal wall-clock time.

IST's full model is reported twice: as reassembled, and with what the split
heads and MLP units add to the residual stream scaled by 1/S
(:func:`width_scaled`; each unit trained in one subnet of S, as dropout
scales at inference).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import asdict

import torch

import istfx
from istfx.models import GPT, GPTConfig
from istfx.models.gpt import lm_loss
from istfx.runtime.optimizers import StepControl, TrainingRecipe


# -- data ------------------------------------------------------------------------


def load_text() -> bytes:
    """The help() topics of this Python, joined: real English and code, no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def split_bytes(data: bytes, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors: the last `val_fraction` of the text is held out."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


class RandomWindows:
    """Batches ``(x, y)`` of random windows, y being x shifted by one byte.

    Every ``iter()`` draws its own stream (each IST subnet reads different
    batches); one pass is ``len(self)`` batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self._streams = 0

    def __len__(self) -> int:
        return max(1, len(self.tokens) // (self.block_size * self.batch_size))

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._streams)
        self._streams += 1
        for _ in range(len(self)):
            yield self.batch(gen)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=gen)
        rows = torch.stack([self.tokens[s: s + self.block_size + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]


def fixed_windows(tokens: torch.Tensor, block_size: int, batch_size: int, batches: int) -> list:
    """Evaluation batches: consecutive non-overlapping windows, the same every time."""
    n = min(batches * batch_size, (len(tokens) - 1) // block_size)
    rows = torch.stack([tokens[i * block_size: i * block_size + block_size + 1] for i in range(n)])
    return [(rows[i:i + batch_size, :-1], rows[i:i + batch_size, 1:]) for i in range(0, n, batch_size)]


# -- training ---------------------------------------------------------------------


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def val_loss(model: torch.nn.Module, val: list) -> float:
    return istfx.evaluate(model, val, loss_fn=lm_loss)["loss"]


@contextlib.contextmanager
def width_scaled(ist: istfx.ISTModel, factor: float):
    """Temporarily scale what split units add to the residual stream by `factor` (1/S), restored exactly.

    During IST each head and MLP unit is in one subnet of S, so each subnet
    learns to produce a residual branch's whole output from 1/S of its units;
    the full model sums all of them. As dropout scales at inference, this
    scales every residual branch's last linear layer, the weights that the
    split units feed (not its bias, which every subnet trains whole).
    """
    from istfx.passes.depth import find_residual_blocks, fold_targets

    slices = ist.slices(0)
    blocks, _ = find_residual_blocks(ist.captured.module)
    names = {n for b in blocks for br in b.branches for n in (fold_targets(ist.captured.module, br) or [])
             if slices.is_cut(n)}
    saved = {n: ist.state_tensor(n).detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            ist.state_tensor(n).mul_(factor)
    try:
        yield ist.model
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                ist.state_tensor(n).copy_(value)


def recipe_from(args: argparse.Namespace) -> TrainingRecipe:
    """The AdamW recipe of the flags: the same for full training and for every subnet."""
    return TrainingRecipe(optimizer="adamw", lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                          clip_grad_norm=args.clip_grad_norm, optimizer_state=args.optimizer_state,
                          outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)


def train_full(model: GPT, train: RandomWindows, val: list, steps: int, recipe: TrainingRecipe) -> dict:
    """Plain training of the whole model; returns the final validation loss and the time."""
    optimizer = recipe.build(list(model.parameters()))
    control = StepControl(recipe.schedule(steps), recipe.clip_grad_norm)
    batches = iter(train)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(train)
            x, y = next(batches)
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        control.before_step(optimizer, step)
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"val_loss": val_loss(model, val), "seconds": seconds, "steps": steps}


def train_ist(model: GPT, subnets: int, train: RandomWindows, val: list, steps: int, local_steps: int,
              recipe: TrainingRecipe, example: torch.Tensor) -> dict:
    """IST with `subnets` subnets: heads and MLP units dealt out, d_model shared."""
    ist = istfx.compile(model, subnets=subnets, example_inputs=(example,))
    rounds = max(1, steps // local_steps)
    start = time.perf_counter()
    history = istfx.fit(ist, train, rounds=rounds, local_steps=local_steps, loss_fn=lm_loss, eval_data=val,
                        eval_every=rounds, progress=False, **recipe.fit_kwargs(total_steps=rounds * local_steps))
    seconds = time.perf_counter() - start
    with width_scaled(ist, 1.0 / subnets) as scaled:
        scaled_loss = val_loss(scaled, val)
    return {"val_loss": history.last["eval_loss"], "val_loss_scaled": scaled_loss, "seconds": seconds,
            "steps": rounds * local_steps,
            "parameters_per_subnet": ist.plan.parameters_per_subnet, "parameters_full": ist.plan.parameters_full}


def add_gpt_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, optimizer and IST options this example shares with ``benchmarks/gpt_ist.py``."""
    parser.add_argument("--local-steps", type=int, default=10, help="IST: steps per subnet per round")
    parser.add_argument("--subnets", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate (betas 0.9, 0.99)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--clip-grad-norm", type=float, default=None)
    parser.add_argument("--optimizer-state", choices=("carry", "reset"), default="carry",
                        help="IST: AdamW's moments travel with their units (carry) or restart every round")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="IST: outer Nesterov step (DiLoCo: 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="IST: outer momentum (DiLoCo: 0.9)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the full model and of each subnet")
    parser.add_argument("--threads", type=int, default=1)
    add_gpt_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_tokens, val_tokens = split_bytes(load_text())
    config = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(args.seed)
    initial = GPT(config).state_dict()
    val = fixed_windows(val_tokens, args.block_size, 32, batches=4)
    example = train_tokens[: 2 * (args.block_size // 2)].view(2, args.block_size // 2)
    print(f"text: {len(train_tokens):,} train / {len(val_tokens):,} val bytes; GPT {asdict(config)}")
    print(f"untrained validation loss {val_loss(_fresh(config, initial), val):.3f} (uniform: {math.log(256):.3f})")

    results = {}
    model = _fresh(config, initial)
    recipe = recipe_from(args)
    print(f"optimizer: {recipe.describe()}")
    results["full"] = train_full(model, RandomWindows(train_tokens, args.block_size, args.batch_size, args.seed),
                                 val, args.steps, recipe)
    _report("full", results["full"])
    for s in args.subnets:
        model = _fresh(config, initial)
        train = RandomWindows(train_tokens, args.block_size, args.batch_size, args.seed)
        results[f"ist{s}"] = train_ist(model, s, train, val, args.steps, args.local_steps, recipe, example)
        _report(f"IST S={s}", results[f"ist{s}"])
        sample = model.generate(torch.tensor([list(b"The ")]), 60, top_k=8,
                                generator=torch.Generator().manual_seed(0))
        print("   sample:", repr(bytes(sample[0].tolist()).decode("utf-8", errors="replace")))
    return results


def _fresh(config: GPTConfig, state: dict) -> GPT:
    model = GPT(config)
    model.load_state_dict(state)
    return model


def _report(name: str, result: dict) -> None:
    extra = ""
    if "parameters_per_subnet" in result:
        extra = f", {max(result['parameters_per_subnet']):,} of {result['parameters_full']:,} parameters per subnet"
    scaled = f" ({result['val_loss_scaled']:.3f} with branch outputs scaled by 1/S)" if "val_loss_scaled" in result \
        else ""
    print(f"{name:>10}: validation loss {result['val_loss']:.3f}{scaled} after {result['steps']} steps "
          f"({result['seconds']:.1f}s{extra})")


if __name__ == "__main__":
    main()
