"""replq commands: calendar (filled in by its issue)."""
