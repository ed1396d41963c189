"""MLproject entry point `benchmark`: hands its parameters to `hpml bench`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="hpml bench")
