"""What client and worker share: messages, their bytes, sans-I/O sessions, websocket framing, resume
bookkeeping, the error tree and the op vocabulary. Nothing here imports from the client or the worker."""
