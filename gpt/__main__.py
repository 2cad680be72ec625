"""`python -m gpt` runs the command line (torchrun uses this form)."""

from gpt.cli import main

if __name__ == "__main__":
    main()
