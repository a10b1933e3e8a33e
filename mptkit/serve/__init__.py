"""The OpenAI-compatible HTTP server: request schemas (protocol.py), the generation worker over the
continuous-batching scheduler (engine.py), Prometheus metrics (metrics.py), the FastAPI app
(app.py) and `mptkit serve` (commands.py)."""
