"""A worker target that blocks as it is imported (it waits for a service that never comes): the
worker runner must say so, not wait in silence."""

import time

time.sleep(3600)
