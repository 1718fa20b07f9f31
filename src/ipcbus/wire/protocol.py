"""The wire protocol between the hub and its clients: every frame of every message is built and
parsed here, in both directions. Imported by the hub and by clients; imports neither, nor zmq.

Every request starts with a two-byte header: the wire version, then the kind. The hub routes on
that header and the topic frame alone and relays payload frames as opaque bytes: it never
unpickles (docs/security.md).

A hub has three sockets. Control and data are separate so that backpressure on the data path
never blocks the control path (a stalled hub still answers HELLO and STATS):

client control DEALER → hub control ROUTER (the hub's address)     ``[header, *body]``
    HELLO    ``[client_id, info?]``  → WELCOME ``[publish_endpoint, fanout_endpoint, hub_id,
                                heartbeat_interval, heartbeat_timeout, max_message_size,
                                spool_dir, *grouped_topics]``: max_message_size is the largest
                                frame the hub accepts (a larger one costs the sender its
                                connection); spool_dir where big buffers may wait in files
                                (empty: nowhere, send them inline; ``wire.spool``)
    STATS    ``[]``           → STATS ``[json]``
    CLIENTS  ``[]``           → CLIENTS ``[json]``: who is connected (``ipcbus clients``)
    QUEUE_ADMIN ``[op, *args]`` → QUEUE_ADMIN ``[status, json, *payloads]``: looking after queue
                                groups, before HELLO too (``wire.queue_admin``)
    INFO     ``[json]``       what the client says about itself changed (its subscriptions)
    PING     ``[]``           → PONG ``[]``  (every heartbeat_interval, both ways alive)
    CONSUME  ``[subscription_id, topic, queue_name, prefetch]``
                              → CONSUMING ``[subscription_id]`` once every client knows the
                                topic is grouped (so it publishes it in a split codec)
    CANCEL   ``[subscription_id]``  no new deliveries; those in flight may still be acked
    ACK      ``[entry * n]``, entry = ``b" ".join([stream, first, last, outcome, retry_delay,
                                error])``: the deliveries ``first`` to ``last`` of one stream
                                (below) had that outcome: ok, failed, rejected, dead;
                                retry_delay (seconds) only for failed. One entry settles a
                                whole range (cumulative): a consumer acks a batch it ran in
                                one entry, and lists failures, rejections and dead letters
                                in entries of their own
    BYE      ``[]``           the client leaves: its unacknowledged deliveries go to others
    DECLARE  ``[request_id, topic, queue_name]`` → DECLARED ``[request_id]`` once the group
                                exists (it holds what is published until consumers come) and
                                every client knows the topic is grouped
    DELETE   ``[request_id, topic, queue_name]`` → DELETED ``[request_id, status, dropped]``:
                                the group and what it holds are gone (status ``ok``), or it
                                still has consumers and stays (status ``in-use``)
  hub → client, unasked:
    DELIVER  ``[(descriptor, meta, sizes, payloads) * n]``: runs of consecutive messages of
                                one producer batch, descriptor = ``b" ".join([subscription_id,
                                stream, first_seq, attempt, id_prefix, first_id, topic])``,
                                sizes and payloads as in a split PUBLISH. Each consumer has a
                                delivery stream (its name starts with the hub's id: unique
                                across hubs, and across the consumer's comings and goings)
                                whose sequence numbers count its deliveries: a run's messages
                                are ``first_seq``, ``first_seq + 1``, ..., their message ids
                                ``<id_prefix>-<first_id>``, ``<id_prefix>-<first_id + 1>``,
                                .... The consumer decides retries and dead letters
                                (ipcbus.core.retry)
    GROUPS   ``[version, *grouped_topics]`` → GROUPS_ACK ``[version]``
    FULL     ``[version, *full_topics]``  topics a queue group of which holds ``max_held``
                                messages: publish() of them waits until the hub lists them no
                                more (after every WELCOME the list is empty until a FULL)
    RESET    ``[]``           the hub does not know this client (it restarted, or declared the
                                client gone): say HELLO and CONSUME again
    STOPPING ``[]``           the hub is shutting down: reconnect to the next one
    LOSSY    ``[]``           the hub sent without waiting for a stalled subscriber (its
                                stall_timeout) and has stopped: a subscriber asks for the
                                sequence numbers of its topics (a check sync, below)
client data DEALER → hub data ROUTER (``<address>.in``)
    PUBLISH  ``[header topic meta, payload, *frames]``: the header, the topic and the meta in
                                one frame (``publish_head``; a frame costs 3-6 us at each end),
                                relayed on XPUB with the hub's seq instead of the header; with a
                                spooled codec ``[head, payload, spool_index, *frames]`` (big
                                buffers in files, ``wire.spool``); with a split codec ``[head,
                                sizes, payloads]``: every message is pickled alone, ``payloads``
                                holds them end to end and ``sizes`` their sizes (uint32,
                                little-endian), so that the hub can hand parts of a batch to
                                queue consumers without unpickling. meta: codec (1 byte),
                                message count (uint32), the publisher's ``time.time()``.
                                A request or a reply (``Broker.request()``) is a batch of one
                                message whose meta carries a route after its 13 bytes
                                (``frames.Route``): a request ``b"q"``, its correlation id
                                (uint64) and the requester's reply topic
                                (``ipcbus:reply:<client_id>`` and the terminator, which the
                                requester subscribes to once); an answer is published on that
                                reply topic with ``b"r"`` (the reply, pickled as an object) or
                                ``b"e"`` (the responder's failure: type name, NUL, text) and the
                                correlation id. The hub relays both as any batch (fan-out, queue
                                groups): it checks the route, never acts on it
    NUMBERED ``[header flags position topic meta, sizes, payloads]``: a split batch (the only
                                kind a topic with queue groups gets), numbered: ``flags`` (1
                                byte; ``AGAIN`` = 1: a copy sent again to a new hub, whose
                                predecessor did not confirm it) and ``position`` (uint64: the
                                messages this client sent up to this batch's last). The hub
                                keeps the runs of positions it read of each publisher (with a
                                journal, across a crash: ``server.positions``) and drops a copy
                                sent again of a batch it has; the other copies it delivers as
                                if delivered once (``attempt`` 2)
    FLUSH    ``[token]``      → FLUSHED ``[token, hub_id]`` once every earlier PUBLISH of this
                                client was handed to the XPUB socket (one DEALER: the order is
                                kept); a client takes it only from the hub that welcomed it
hub XPUB (``<address>.pub``) → client SUB   ``[topic seq publisher meta, *payload]`` (one head
    frame, ``fanout_head``: the topic first, for the SUB socket's prefix match; publisher is the
    client id of the process that published, length first) or a sync answer
    seq counts the *messages* of the topic the hub has relayed, this batch's included, since a
    subscriber last held the topic (the hub forgets the count of a topic nobody holds): a
    subscriber that sees ``seq - count`` (count from meta) beyond the last seq it saw knows the
    hub dropped that many messages for it (it had accepted nothing for the hub's stall_timeout)

Topics are the message type's unique name plus a terminator byte, so ``a.Tick`` is not a prefix of
``a.TickV2`` for the SUB socket's prefix matching. Sync topics start with ``\\x00`` (no unique name
does): a proxy subscribes to its topic and then to a fresh sync topic on the same SUB socket; the
XPUB socket applies subscriptions of one connection in order, so when the hub sees the sync
subscription the topic is live, and it answers on the sync topic. That is how ``subscribe()`` knows
it will miss nothing published afterwards (no slow joiner, docs/guarantees.md).

A client's sync topic names the topics it asks about (``seq_sync_topic``), and the answer carries
their seqs: ``[sync_topic, seqs]`` (8 bytes per topic named, in order). Sent through the same pipe
as the batches, after every batch the hub sent to it before, it tells exactly how many messages of
each topic the subscriber missed. ``baseline`` answers (a new subscription, a new hub) set the
count a subscriber starts from; ``check`` answers (the hub said LOSSY, a reconnect to the same
hub) count the messages missed since the last batch seen, the tail included: after one drop,
ZeroMQ sends nothing more to that pipe (batches, answers) until its reader catches up, so a client
asks again until it is answered. A sync topic of another form is answered ``[sync_topic]``.

Parsers raise ``ValueError`` (or ``IndexError``) on malformed input: the hub counts and drops it.
"""

from __future__ import annotations

from .control_frames import (
    Welcome,
    full,
    groups,
    groups_ack,
    hello,
    lossy,
    parse_full,
    parse_groups,
    parse_groups_ack,
    parse_hello,
)
from .data_frames import (
    AGAIN,
    Fanout,
    fanout,
    fanout_head,
    flush,
    flushed,
    parse_data_kind,
    parse_fanout_head,
    parse_flushed,
    parse_numbered_head,
    parse_publish_head,
    publish,
    publish_head,
    publish_numbered,
    sent_again,
)
from .frames import (
    ACK,
    BYE,
    CANCEL,
    CLIENTS,
    CODEC_DATACLASS,
    CODEC_OBJECTS,
    CODEC_SPLIT_DATACLASS,
    CODEC_SPLIT_OBJECTS,
    CODEC_SPOOL_DATACLASS,
    CODEC_SPOOL_OBJECTS,
    CONSUME,
    CONSUMING,
    DECLARE,
    DECLARED,
    DELETE,
    DELETED,
    DELIVER,
    FLUSH,
    FLUSHED,
    FULL,
    GROUPS,
    GROUPS_ACK,
    HEADER_LEN,
    HELLO,
    INFO,
    LOSSY,
    MAX_ACKS,
    MAX_BUFFERS,
    MAX_FAILURE_TEXT,
    MAX_FRAMES,
    MAX_RETRY_DELAY,
    MAX_TOPIC_LEN,
    META_LEN,
    NUMBERED,
    OUTCOME_DEAD,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    OUTCOMES,
    PING,
    PONG,
    PUBLISH,
    REPLY_PREFIX,
    RESET,
    ROUTE_FAILURE,
    ROUTE_REPLY,
    ROUTE_REQUEST,
    SPLIT_CODECS,
    SPOOL_CODECS,
    STATS,
    STOPPING,
    SYNC_BASELINE,
    SYNC_CHECK,
    SYNC_PREFIX,
    TOPIC_END,
    VERSION,
    WELCOME,
    Meta,
    Route,
    SyncReply,
    check_topic,
    header,
    is_sync_topic,
    pack_failure,
    pack_meta,
    pack_reply_meta,
    pack_request_meta,
    pack_seq,
    parse_failure,
    parse_kind,
    parse_seq_sync,
    reply_topic,
    route_of,
    seq_sync_topic,
    sync_reply,
    sync_topic,
    topic_for,
    unique_name_of,
    unpack_meta,
    unpack_seq,
)
from .queue_frames import (
    DELETED_IN_USE,
    DELETED_OK,
    Ack,
    Consume,
    DeclareQueue,
    DeleteQueue,
    Deliver,
    acks,
    cancel,
    consuming,
    declared,
    deleted,
    deliver,
    parse_acks,
    parse_cancel,
    parse_declared,
    parse_deleted,
    parse_deliver,
)
from .sizes import check_split, pack_sizes, split_payloads, unpack_sizes

__all__ = [
    "AGAIN",
    "ACK",
    "Ack",
    "BYE",
    "CANCEL",
    "CLIENTS",
    "CODEC_DATACLASS",
    "CODEC_OBJECTS",
    "CODEC_SPLIT_DATACLASS",
    "CODEC_SPLIT_OBJECTS",
    "CODEC_SPOOL_DATACLASS",
    "CODEC_SPOOL_OBJECTS",
    "CONSUME",
    "CONSUMING",
    "Consume",
    "DECLARE",
    "DECLARED",
    "DELETE",
    "DELETED",
    "DELETED_IN_USE",
    "DELETED_OK",
    "DELIVER",
    "DeclareQueue",
    "DeleteQueue",
    "Deliver",
    "FLUSH",
    "FLUSHED",
    "FULL",
    "Fanout",
    "GROUPS",
    "GROUPS_ACK",
    "HEADER_LEN",
    "HELLO",
    "INFO",
    "LOSSY",
    "MAX_ACKS",
    "MAX_BUFFERS",
    "MAX_FAILURE_TEXT",
    "MAX_FRAMES",
    "MAX_RETRY_DELAY",
    "MAX_TOPIC_LEN",
    "META_LEN",
    "Meta",
    "NUMBERED",
    "OUTCOMES",
    "OUTCOME_DEAD",
    "OUTCOME_FAILED",
    "OUTCOME_OK",
    "OUTCOME_REJECTED",
    "PING",
    "PONG",
    "PUBLISH",
    "REPLY_PREFIX",
    "RESET",
    "ROUTE_FAILURE",
    "ROUTE_REPLY",
    "ROUTE_REQUEST",
    "Route",
    "SPLIT_CODECS",
    "SPOOL_CODECS",
    "STATS",
    "STOPPING",
    "SYNC_BASELINE",
    "SYNC_CHECK",
    "SYNC_PREFIX",
    "SyncReply",
    "TOPIC_END",
    "VERSION",
    "WELCOME",
    "Welcome",
    "acks",
    "cancel",
    "check_split",
    "check_topic",
    "consuming",
    "declared",
    "deleted",
    "deliver",
    "header",
    "is_sync_topic",
    "pack_failure",
    "pack_meta",
    "pack_reply_meta",
    "pack_request_meta",
    "pack_seq",
    "fanout_head",
    "parse_fanout_head",
    "parse_numbered_head",
    "parse_publish_head",
    "publish_head",
    "publish_numbered",
    "parse_data_kind",
    "pack_sizes",
    "parse_acks",
    "parse_cancel",
    "parse_declared",
    "parse_deleted",
    "parse_deliver",
    "parse_failure",
    "parse_kind",
    "parse_seq_sync",
    "reply_topic",
    "route_of",
    "sent_again",
    "seq_sync_topic",
    "split_payloads",
    "sync_reply",
    "sync_topic",
    "topic_for",
    "unique_name_of",
    "unpack_meta",
    "unpack_seq",
    "unpack_sizes",
    "full",
    "groups",
    "groups_ack",
    "hello",
    "lossy",
    "parse_full",
    "parse_groups",
    "parse_groups_ack",
    "parse_hello",
    "fanout",
    "flush",
    "flushed",
    "parse_flushed",
    "publish",
]
