"""`python -m ocomp` is the `ocomp` command."""

from ocomp.cli import main

main(prog_name="ocomp")
