"""One module per `qwen35` subcommand (see qwen35/cli.py)."""
