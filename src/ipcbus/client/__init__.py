"""The client side: what runs inside each worker process that talks to a hub.

- ``broker``: ``HubBroker`` and ``connect()``, the public face of this package.
- ``io``: the I/O thread that owns the process's sockets.
- ``session``: whether the hub is there (HELLO, heartbeats, reconnect, resync).
- ``outbox``: what ``publish()`` queued, batched into requests.
- ``subscriptions``: the SUB socket's subscriptions, sync topics, and a batch held back.
- ``control``: control requests waiting to leave; queue consumers to restore.
- ``dispatch``: the thread that calls broadcast handlers.
- ``runner``: the threads and event loop that run queue handlers and ack them.
- ``admin``: one-off requests (statistics) without joining the bus.
"""
