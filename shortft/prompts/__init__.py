"""Prompt sets that ship with the package, read as `builtin:prompts/<file>`."""
