"""MLproject entry point `train_squad`: hands its parameters to `hpml train-squad`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["train-squad", *sys.argv[1:]], prog_name="hpml train-squad")
