"""replq commands: services (filled in by its issue)."""
