"""The streaming engine: wraps the pure model functions with layer streaming, recompute,
gradient staging and the host optimizer."""
