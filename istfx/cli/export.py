"""``istfx export``: one safetensors file (or a Hugging Face folder) out of an istfx checkpoint.

::

    istfx export ckpt/ --out model.safetensors                  # newest checkpoint under ckpt/
    istfx export run.dcp --out model.safetensors                # what a sharded `istfx train --save run.dcp` wrote
    istfx export ckpt/round-000009 --out m.safetensors --model model.py --hf-dir hf/   # also save_pretrained

Streams the model out of the checkpoint's chunks a block of rows at a time
(:func:`istfx.runtime.export.export`): on one machine, without holding the
model twice, every chunk checked against its CRC-32. ``--hf-dir`` builds the
model of ``--model`` (a Hugging Face model), loads the exported weights into
it and calls its ``save_pretrained``.

Parsing imports no torch; the work is done in :mod:`istfx.runtime.export`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from istfx.errors import ISTError

__all__ = ["EPILOG", "configure", "run"]

EPILOG = """examples:
  istfx export ckpt/ --out model.safetensors
  istfx export run.dcp --out model.safetensors --model model.py --hf-dir hf/
"""


def configure(p: argparse.ArgumentParser) -> None:
    """``istfx export``'s options."""
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint directory: a --checkpoint-dir (its newest complete checkpoint), one round "
                        "directory in it, or the directory a sharded `istfx train --save` wrote")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="the file to write (atomically)")
    p.add_argument("--hf-dir", default=None, metavar="DIR",
                   help="also write a Hugging Face folder with the model's save_pretrained (needs --model)")
    p.add_argument("--model", default=None, metavar="MODEL.py",
                   help="the model file (for --hf-dir: its model must be a Hugging Face PreTrainedModel)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse --hf-dir without --model before any work."""
    if args.hf_dir is not None and args.model is None:
        parser.error("--hf-dir needs --model MODEL.py (the model whose save_pretrained writes the folder)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run ``istfx export`` for parsed `args`; returns the exit status."""
    source = Path(args.checkpoint)
    if not source.exists():
        raise ISTError(f"{source} does not exist: pass a checkpoint directory (--checkpoint-dir of a run, one of "
                       "its round-NNNNNN directories, or a sharded --save directory).")
    if not source.is_dir():
        raise ISTError(f"{source} is a file: istfx export reads checkpoint directories (a --save file of a ps or "
                       "local run already is one safetensors file).")
    from istfx.runtime.export import export, save_pretrained

    out = export(source, args.out)
    print(f"istfx: wrote {out}", flush=True)
    if args.hf_dir is not None:
        from istfx.cli.loader import load_model_file

        with contextlib.redirect_stdout(sys.stderr):  # the model file's prints do not mix with the report
            model = load_model_file(args.model).model
        folder = save_pretrained(out, args.hf_dir, model)
        print(f"istfx: wrote {folder} (save_pretrained)", flush=True)
    return 0
