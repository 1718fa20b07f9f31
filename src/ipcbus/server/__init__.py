"""The hub process: everything here runs inside the hub, never in a worker.

- ``process``: the hub process's entry point, and the checks of its address.
- ``claim``: one hub per address (a lock), and removing only the socket files it bound.
- ``relay``: the serving loop (sockets, authentication, reading requests).
- ``preauth``: on tcp, limits on connections that have not authenticated yet.
- ``fanout``: the XPUB side: sending batches, backpressure, stalled subscribers.
- ``control``: clients, heartbeats, queue consumers, over the control socket.
- ``queues``: the queue book: held messages, fair dispatch, acks, redelivery.
- ``runs``: runs, the queue book's unit: consecutive messages of one producer batch.
- ``clients``: who is connected, as each client describes itself (``ipcbus clients``).
- ``groups_file``: the declared queue groups, kept for a restart at the same address.

Imports only the wire, the configuration and the exceptions; never the client side, the core or
cloudpickle: the hub never unpickles.
"""
