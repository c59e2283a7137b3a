"""The checkpoint worker process: ``python -m aiockpt._worker --fd N``.

It serves one parent over one socketpair: a handshake that runs the init functions, then PINGs
answered at once and WRITE_CHECKPOINT / TERMINATE_PROCESS requests handled in arrival order,
each write in a thread so that the loop keeps answering. EOF on the channel means the parent
died: the worker exits at once.
"""
