"""`python -m shardtool`: the same as the `shardtool` command."""

from shardtool.cli import main

if __name__ == "__main__":  # worker processes import __main__ again (forkserver preload): no second run
    main()
