"""REST frontend (FastAPI): validates jobs, stores them in Redis, serves artifacts.

This package must never import torch or ray; its image has neither.
"""
