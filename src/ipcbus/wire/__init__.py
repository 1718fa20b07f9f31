"""The wire between processes, imported by the hub process and by clients alike.

- ``protocol``: every frame of every message, built and parsed in one place; no zmq. Its
  vocabulary (kinds, limits, topics, meta and seq frames, checks) is in ``frames``, the frames
  of queue groups in ``queue_frames``; ``protocol`` re-exports both.
- ``address``: a hub address parsed once; no zmq.
- ``statistics``: the hub's statistics record, as it travels in a STATS reply; no zmq.
- ``paths``: directories and files checked before they are trusted; no zmq.
- ``keys``: the bus secret and how each side of a socket proves it (imports zmq).
"""
