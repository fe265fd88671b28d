"""The ``gift`` subcommands, one module each, named after the command: ``add_arguments(parser)`` and
``run(args) -> int``. A command module imports the shared pieces of `gift.app` and the library, never
another command module."""
