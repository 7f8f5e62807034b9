"""``python -m zmqruntime``: the command-line interface (see ``docs/cli.md``)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
