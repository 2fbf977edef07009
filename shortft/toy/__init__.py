"""The toy world: a small SD-architecture text-to-image model, its shortcut and its reward models,
trained here from procedurally drawn images and shipped in `assets/` (see `build.py`)."""
