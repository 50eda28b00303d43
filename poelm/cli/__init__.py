"""The `poelm` command line, the top floor: nothing outside this package imports it.

main.py holds the command registry, the parser and the one error policy; common.py what the
commands share; every other module one command group, its flags and its handlers.
`poelm = "poelm.cli:main"` is the console script, `python -m poelm` the same.
"""

from poelm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
