"""The command-line entry point."""
