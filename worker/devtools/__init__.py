"""Developer tools: the provider sandboxes, the demo, sample events and the benchmark.

Nothing the running worker imports lives here (``invoicing-worker run`` never loads this
package; an import-linter contract and tests/unit/test_layers.py check it). The CLI reaches
these modules only inside the ``demo``, ``sandbox`` and ``bench`` subcommands.
"""
