"""The ``innfer`` command line: the one place that imports both the torch side (runtime.inn,
runtime.build) and the serving side (server), each lazily inside its command."""
