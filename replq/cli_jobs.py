"""replq commands: jobs (filled in by its issue)."""
