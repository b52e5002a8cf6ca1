"""replq commands: sandbox (filled in by its issue)."""
