"""``python -m fastft ...`` is the ``fastft`` command (what torchrun and accelerate launch run with -m)."""
import sys

from .cli import main

sys.exit(main())
