"""Built-in search spaces for `tune/sweep.py --space <name>`."""
