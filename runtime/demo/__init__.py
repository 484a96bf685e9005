"""The bundled demo: small models (zoo), offline data sets (data) and their training
recipes (training). Used by ``innfer demo``, the benchmarks and the tests."""
