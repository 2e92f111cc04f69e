"""`python -m mesh_convert.train RECIPE [key=value ...] [--dry-run] [--overwrite]`, what launchers
run (`accelerate launch -m mesh_convert.train RECIPE`): the `mesh-convert train` command itself."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
