"""Exit statuses of the moba-rewrite command (docs/CLI.md), in one place: the CLI returns
them and the library's checkpoint errors carry the one that fits them."""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected failure (rerun with --debug)
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_CHECKPOINT = 3  # input missing, unreadable or corrupt
EXIT_ARCHITECTURE = 4  # model cannot be built or rewritten (unknown architecture, unsupported site)
EXIT_POLICY = 5  # bad policy file
EXIT_OUTPUT_EXISTS = 6  # output exists and --force was not given
EXIT_OUTPUT_UNWRITABLE = 7  # output cannot be written
EXIT_VALUE = 8  # an option's value does not fit the model or policy (e.g. --seq-len below one block)
EXIT_PICKLE = 9  # pickled module refused without --trust-pickle
EXIT_VERIFY = 10  # the written artifact does not reproduce the rewritten model
EXIT_EXPORT = 11  # export / compile of the rewritten model failed
EXIT_MISSING_PACKAGE = 12  # an optional package the command needs is not installed
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): stopped, nothing written
EXIT_TERMINATED = 143  # SIGTERM: stopped, nothing written

