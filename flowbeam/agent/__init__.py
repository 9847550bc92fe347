"""The capture agent (``flowbeam capture``): packets to Pub/Sub batches, Beam-free.

A live interface (``live``) or a capture file (``replay``) yields packets; ``batcher`` groups
them by packets, bytes and seconds; ``batch_format`` turns a group into a message (a pcap file
plus attributes: the contract with the streaming pipeline, which imports the same names);
``publisher`` sends it with retries, a memory bound and a disk ``spool``; ``runner`` is the loop
and ``command`` the command line. ``capture_filter`` keeps the agent's own uploads out of the
capture.
"""
