"""MLproject entry point `train_sst2`: hands its parameters to `hpml train-sst2`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["train-sst2", *sys.argv[1:]], prog_name="hpml train-sst2")
