"""A job's consumer settings (restconsumer.kafka.consumer.consumer_config)."""

from __future__ import annotations

from restconsumer.kafka.consumer import CLASSIC_ONLY, consumer_config


def test_rebalances_are_cooperative_by_default() -> None:
    config = consumer_config({}, "j")
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["group.id"] == "restconsumer.j" and config["enable.auto.commit"] is False


def test_the_consumer_protocol_gets_none_of_the_classic_settings() -> None:
    """KIP-848's group.protocol=consumer refuses them (librdkafka: _INVALID_ARG)."""
    config = consumer_config({"group.protocol": "consumer"}, "j")
    assert not set(CLASSIC_ONLY) & set(config)
    assert config["group.protocol"] == "consumer"


def test_the_operator_may_choose_another_assignor() -> None:
    assert consumer_config({"partition.assignment.strategy": "range"}, "j")[
        "partition.assignment.strategy"] == "range"
