"""One module per `slimlm` sub-command: HELP, add_arguments(parser), run(args)."""
