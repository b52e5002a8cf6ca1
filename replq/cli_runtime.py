"""replq commands: runtime (filled in by its issue)."""
