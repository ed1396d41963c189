"""MLproject entry point `train_mnli`: hands its parameters to `hpml train-mnli`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["train-mnli", *sys.argv[1:]], prog_name="hpml train-mnli")
