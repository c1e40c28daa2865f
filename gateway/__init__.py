"""gateway: API keys, rate limits, conversation history, audit and traces in front of an
OpenAI-compatible chat backend."""

__version__ = "0.1.0"
