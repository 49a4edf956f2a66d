"""`smalltalk plan`: dense, pure mixture or split training for a given size, budget and E, from a fitted law."""
