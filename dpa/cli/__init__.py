"""One module per ``dpa`` subcommand; each is thin: parse, call a library function, report."""
