"""The in-process brokers (``MemoryBroker``, ``NullBroker``, ``TestBroker``): they deliver
within the process that publishes, built on the core alone; never import zmq."""
