"""`python -m mesh_convert.train RECIPE [key=value ...] [--dry-run] [--overwrite] [--debug]`, what
launchers run (`accelerate launch -m mesh_convert.train RECIPE`): the `mesh-convert train` command itself.
An entry point, the package's top layer like `python -m mesh_convert`, not part of `train`: it lives
in train's folder only because `-m` names a package."""

import sys

from ..cli import main

args = sys.argv[1:]
debug = ["--debug"] if "--debug" in args else []  # an option of the program, before the command
sys.exit(main([*debug, "train", *(arg for arg in args if arg != "--debug")]))
