"""Built-in plugins, one module each. They register through the ``gateway.plugins`` entry-point group."""
