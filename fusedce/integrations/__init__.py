"""Integrations of fusedce into other libraries (imported on demand: each one imports its library)."""
