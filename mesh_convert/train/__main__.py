"""`python -m mesh_convert.train RECIPE [key=value ...] [--dry-run] [--overwrite] [--debug]`, what
launchers run (`accelerate launch -m mesh_convert.train RECIPE`): the `mesh-convert train` command itself."""

import sys

from ..cli import main

args = sys.argv[1:]
debug = ["--debug"] if "--debug" in args else []  # an option of the program, before the command
sys.exit(main([*debug, "train", *(arg for arg in args if arg != "--debug")]))
