"""smalltalk: asynchronous mixtures of language models (SmallTalk LM, ICLR 2025)."""

__version__ = "0.1.0"
