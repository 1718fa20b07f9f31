"""The in-process core, used by every broker in every process; never imports zmq.

- ``contract``: the ``Broker`` contract, ``Subscription``, ``AsyncMessageContext``.
- ``handlers``: how broadcast and queue handlers are called.
- ``failures``: what a handler's exception means (``BaseException`` included: a failure).
- ``retry``: the retry / dead-letter rule of queue groups (``QueuePolicy``).
- ``routing``: the in-process route table of MemoryBroker and TestBroker.
- ``registry``: this process's broker and the ``Consumer`` declarations bound to it.
- ``codec``: how messages become bytes and back.
- ``loops``: event-loop threads of our own.
"""
