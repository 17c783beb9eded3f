"""Command-line commands; each module has ``register(app)``."""
