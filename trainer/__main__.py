"""`python -m trainer`: the same as the `trainer` command (torchrun uses it: `torchrun ... -m trainer fit ...`)."""

from trainer.cli import main

main()
