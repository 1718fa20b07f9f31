"""The client side: what runs inside each worker process that talks to a hub.

- ``broker``: ``HubBroker`` and ``connect()``, the public face of this package.
- ``io``: the I/O thread that owns the process's sockets.
- ``session``: whether the hub is there (HELLO, heartbeats, reconnect, resync).
- ``outbox``: what ``publish()`` queued, batched into requests below the hub's frame limit.
- ``rejections``: messages ``publish()`` accepted and the outbox then rejected: logged, counted,
  and named by the next ``flush()``.
- ``subscriptions``: the SUB socket's subscriptions, sync topics, and a batch held back.
- ``control``: control requests waiting to leave; queue consumers and deletions to restore.
- ``dispatch``: the thread that calls broadcast handlers.
- ``runner``: the threads and event loop that run queue handlers and ack them.
- ``threads``: guarded threads (none dies silently: the broker fails loudly), and which of them
  run handlers (``publish()`` from those never waits for room).
- ``notify``: the thread that calls the user's ``on_hub_state`` callback.
- ``gate``: where ``publish()`` waits (room in the outbox, a full topic to reopen).
- ``watch``: the sockets' monitors (a closed hub connection, impostor handshakes).
- ``describe``: what this client says about itself to the hub (``ipcbus clients``).
- ``acks``: queue acks collected and coalesced into ranges.
- ``admin``: one-off requests (statistics, clients) without joining the bus.
"""
