"""Exports of a saved mixq folder to the formats other runtimes read (`gguf`, `compressed`)."""


class ExportError(ValueError):
    pass
