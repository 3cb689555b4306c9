"""OpenAI-compatible HTTP server on the engine: `nanoflow serve`."""
