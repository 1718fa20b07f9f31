"""The hub process: everything here runs inside the hub, never in a worker.

- ``process``: the hub process's entry point, and the checks and clean-up of its address.
- ``relay``: the serving loop (sockets, authentication, reading requests).
- ``fanout``: the XPUB side: sending batches, backpressure, stalled subscribers.
- ``control``: clients, heartbeats, queue consumers, over the control socket.
- ``queues``: the queue book: held messages, fair dispatch, acks, redelivery.

Imports only the wire, the configuration and the exceptions; never the client side, the core or
cloudpickle: the hub never unpickles.
"""
