"""netisolate: container-level network isolation for Kubernetes pods."""

__version__ = "0.1.0"
