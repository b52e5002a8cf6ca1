"""replq commands: run (filled in by its issue)."""
