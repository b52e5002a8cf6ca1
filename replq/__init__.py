"""replq: scheduled, snapshot-based ZFS replication for guests, on Celery + Redis."""

__version__ = "0.1.0"
