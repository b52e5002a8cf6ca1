"""replq commands: inventory (filled in by its issue)."""
