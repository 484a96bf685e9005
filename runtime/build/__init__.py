"""The build pipeline (torch): sample each tier -> ONNX -> engine -> validate -> profile.

>>> from runtime.build.pipeline import build_model  # doctest: +SKIP
>>> report = build_model(Repository("repo"), "mnist")  # doctest: +SKIP
"""
