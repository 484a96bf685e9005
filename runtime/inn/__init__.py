"""The INN library (torch): continuous weights, group tracing, permutation, conversion,
the IntegralModel, random-width training, calibration and width reports.

    >>> from runtime.inn.conversion import convert  # doctest: +SKIP
    >>> inn = convert(model, (x,))  # doctest: +SKIP
"""
