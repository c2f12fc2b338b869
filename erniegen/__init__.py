"""erniegen: turn any BERT-family checkpoint into a text generator."""
__version__ = "0.1.0"
