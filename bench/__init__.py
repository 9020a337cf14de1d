"""The benchmark harness (`gpg-vlm bench`) and its results; part of the source checkout, not the package."""
