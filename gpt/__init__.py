"""gpt: a small, readable GPT toolkit (tokenize, train, sample) driven by one command line."""

__version__ = "0.1.0"
