"""The command-line programs; installed as `tfscale.cli.scripts` and run by the console commands (`tfscale.cli`)."""
