"""Configuration: the validated model of ``gateway.yaml``, its loader and example profiles."""
from .loader import ConfigError, load_config, load_config_text
from .model import GatewayConfig

__all__ = ["ConfigError", "GatewayConfig", "load_config", "load_config_text"]
