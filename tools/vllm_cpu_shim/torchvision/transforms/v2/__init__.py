"""See torchvision/__init__.py of this shim."""
