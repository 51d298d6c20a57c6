"""``python -m groundseg.train ...`` / ``accelerate launch -m groundseg.train ...`` = ``groundseg train ...``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
