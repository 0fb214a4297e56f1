"""A model, a regularizer and a dataset of your own, used by ``overfocus`` through import paths (see README.md)."""
