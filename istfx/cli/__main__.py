"""``python -m istfx.cli`` is ``istfx``."""
import sys

from istfx.cli.main import main

sys.exit(main())
