"""MLproject entry point `vram_probe`: hands its parameters to `hpml vram-probe`."""
import sys

from hpml.cli import main

if __name__ == "__main__":
    main(["vram-probe", *sys.argv[1:]], prog_name="hpml vram-probe")
