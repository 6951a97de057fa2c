"""llmkit's built-in block catalogue (import name `llmkit_blocks`), registered as a plugin.

One module per block family; each holds the config model, the parameter contract and the one
reference implementation, which defines the semantics every backend must reproduce.
"""
