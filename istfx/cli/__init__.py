"""The ``istfx`` command line: thin over the library."""
from istfx.cli.main import main

__all__ = ["main"]
