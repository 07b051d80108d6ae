"""`python -m gpt2lab ...` (and `torchrun -m gpt2lab ...`) runs the CLI."""

from .cli import main

main()
