"""Reading and writing models: atomic writes, lowbit's own checkpoint format."""
