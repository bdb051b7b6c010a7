"""Service code shared by the REST frontend and the Ray workers: job requests, records, store, queue.

Nothing here imports torch or Ray: the API image has neither, and it imports this package.
"""
