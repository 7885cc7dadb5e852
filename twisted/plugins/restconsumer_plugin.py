"""The ``twistd restconsumer`` plugin: tunes the interpreter, then builds the service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _RestConsumer:
    """What ``twistd`` finds; ``restconsumer.tap`` is imported only when it is run (listing
    the plugins imports every plugin module)."""

    tapname = "restconsumer"
    description = "Read Kafka topics and turn every message into a REST request, as jobs declare."

    @property
    def options(self) -> Any:
        """The command line's options (``restconsumer.tap.Options``)."""
        from restconsumer import tap  # not at plugin discovery: see the class docstring

        return tap.Options

    def makeService(self, options: Any) -> IService:  # IServiceMaker's name
        """Tune the interpreter for the service, then build it."""
        from restconsumer import tap

        tap.tune_interpreter()
        return tap.makeService(options)


restconsumer = _RestConsumer()
