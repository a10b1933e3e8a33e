"""The OpenAI-compatible HTTP server: request schemas (protocol.py), the batching generation
worker (engine.py), the FastAPI app (app.py) and `mptkit serve` (commands.py)."""
