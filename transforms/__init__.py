"""The reusable core of flowbeam: decoders, the flow engine, sinks and dead letters."""
