"""fedge coordinator: validates device updates, aggregates them asynchronously and publishes global versions."""

__version__ = "0.1.0"
