"""The argument parser of every ``mlx-localnorm`` command."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line: the usage text of many flags would bury them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")
