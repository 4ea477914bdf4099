"""Shared helpers every layer uses: user-facing errors, atomic and safe file I/O, box geometry."""
