from shardtool.cli import main

main()
