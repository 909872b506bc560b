"""backdoor-engine: scan image-classification training sets for backdoor-poisoned samples."""

__version__ = "0.1.0"
