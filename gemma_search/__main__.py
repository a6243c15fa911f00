"""`python -m gemma_search` is the `gemma-search` command."""

from gemma_search.cli import main

main()
