"""rain: build, store, register and deploy virtual machine images."""

__version__ = "0.1.0"
