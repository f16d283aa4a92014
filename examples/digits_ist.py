"""IST versus full-model training of the IST paper's MLP on the scikit-learn digits.

Both runs start from the same initial weights, use the same optimizer and see
the same number of training samples (epochs are counted in samples: with S
subnets, one IST round of `local_steps` steps consumes S * local_steps
batches). The script prints both test accuracies.

    python examples/digits_ist.py                      # 4 subnets, 40 epochs
    python examples/digits_ist.py --subnets 2 --local-steps 5 --epochs 20
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from istfx.models import ISTMLP

import istfx
from istfx.runtime.data import digits, loaders
from istfx.runtime.training import evaluate, fit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subnets", type=int, default=4, help="independent subnets per round (S)")
    parser.add_argument("--epochs", type=float, default=40.0,
                        help="training epochs, counted in samples across all subnets (sets --rounds)")
    parser.add_argument("--rounds", type=int, default=None, help="IST rounds (default: from --epochs)")
    parser.add_argument("--local-steps", type=int, default=10, help="SGD steps per subnet per round")
    parser.add_argument("--width", type=int, default=256, help="neurons of each of the two hidden layers")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (both runs)")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (both runs)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and the rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--metrics", default=None, help="write IST per-round metrics to this JSON Lines file")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    return parser.parse_args()


def train_full(model, train_loader, samples: int, optimizer) -> int:
    """Plain minibatch training of the whole model until it has seen `samples` samples."""
    model.train()
    seen = 0
    while seen < samples:
        for inputs, targets in train_loader:
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(targets)
            if seen >= samples:
                break
    return seen


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train, test = digits(seed=args.seed)
    torch.manual_seed(args.seed)
    model = ISTMLP(64, [args.width, args.width], 10)
    full_model = copy.deepcopy(model)

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)

    rounds = args.rounds or max(1, math.ceil(args.epochs * len(train) / (args.subnets * args.local_steps
                                                                            * args.batch_size)))

    # -- IST ---------------------------------------------------------------------
    start = time.perf_counter()
    ist = istfx.compile(model, subnets=args.subnets, seed=args.seed)
    compile_seconds = time.perf_counter() - start
    train_loader, test_loader = loaders(train, test, batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    history = fit(ist, train_loader, rounds=rounds, local_steps=args.local_steps, optimizer=make_optimizer,
                  eval_data=test_loader, eval_every=max(1, rounds // 10), metrics_path=args.metrics,
                  progress=args.progress)
    ist_seconds = time.perf_counter() - start
    ist_scores = evaluate(ist.finalize(), test_loader)  # finalize: no-op unless blocks were dealt out
    samples = history.last["samples_total"]

    # -- full-model training, same optimizer, same number of samples --------------
    train_loader, test_loader = loaders(train, test, batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    seen = train_full(full_model, train_loader, samples, make_optimizer(full_model.parameters()))
    full_seconds = time.perf_counter() - start
    full_scores = evaluate(full_model, test_loader)

    print(ist.plan)
    print()
    for row in history:
        if row["eval_accuracy"] is not None:
            print(f"  round {row['round']:4d}  epochs {row['epochs']:6.2f}  train loss {row['train_loss']:.4f}"
                  f"  test acc {row['eval_accuracy']:.4f}")
    print()
    print(f"digits: {len(train)} train / {len(test)} test, MLP 64-{args.width}-{args.width}-10, "
          f"SGD lr {args.lr} momentum {args.momentum}, batch {args.batch_size}")
    print(f"IST  ({args.subnets} subnets, {rounds} rounds x {args.local_steps} local steps): "
          f"test accuracy {ist_scores['accuracy']:.4f}  loss {ist_scores['loss']:.4f}  "
          f"epochs {samples / len(train):.2f}  {ist_seconds:.1f}s (+{compile_seconds:.1f}s compile)")
    print(f"full (plain minibatch SGD):                  "
          f"test accuracy {full_scores['accuracy']:.4f}  loss {full_scores['loss']:.4f}  "
          f"epochs {seen / len(train):.2f}  {full_seconds:.1f}s")
    print(f"IST - full: {100 * (ist_scores['accuracy'] - full_scores['accuracy']):+.2f} points; "
          f"each IST subnet holds {max(ist.plan.parameters_per_subnet):,} of "
          f"{ist.plan.parameters_full:,} parameters")


if __name__ == "__main__":
    main()
