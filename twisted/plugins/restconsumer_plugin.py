"""The ``twistd restconsumer`` plugin."""

from twisted.application.service import ServiceMaker

restconsumer = ServiceMaker(
    "restconsumer",
    "restconsumer.tap",
    "Read Kafka topics and turn every message into a REST request, as jobs declare.",
    "restconsumer",
)
