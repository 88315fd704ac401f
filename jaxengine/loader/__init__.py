"""jaxengine."""
