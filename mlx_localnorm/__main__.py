"""``python -m mlx_localnorm <command>`` (the same as ``mlx-localnorm``; handy under mlx.launch)."""

import sys

from .cli import main

sys.exit(main())
