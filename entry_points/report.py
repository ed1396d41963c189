"""MLproject entry point `report`: hands its parameters to `hpml report`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["report", *sys.argv[1:]], prog_name="hpml report")
