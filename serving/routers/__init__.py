"""The server's routes in three routers: probes (health, readiness, metrics), admin (the
hosted models: list, reload) and score."""
