"""gpg_vlm: Group Policy Gradient (GPG, arXiv 2504.02546) for Qwen vision-language models.

Importing the package is cheap and side-effect free: torch and transformers are imported by
the modules that need them (the adapter, the trainer), never here.
"""

__version__ = "0.1.0"
