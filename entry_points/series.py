"""MLproject entry point `series`: hands its parameters to `hpml series`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["series", *sys.argv[1:]], prog_name="hpml series")
