"""The HTTP server: TGI- and OpenAI-compatible request schemas, validation and response bodies."""
