"""The live loop: events on Redis Streams -> FM codes -> the online store, within a second.

    producer.py   events and catalog upserts onto P partitions (stream keys) by a stable hash
    messages.py   the wire format of one message and its validation (bad ones: dead letters)
    state.py      a user's running state: the FM's inputs so far and the VM's histories
    online.py     writes in Feast's Redis layout, idempotent per event
    bootstrap.py  every user's and item's starting state, from the run's batch tables
    worker.py     `loopfm stream`: leases partitions, applies micro-batches, acks after both writes

The offline files a worker appends are loopfm/data/streamed.py's (training reads them too).

DESIGN.md stage 7. The FM runs here, never in the server.
"""
