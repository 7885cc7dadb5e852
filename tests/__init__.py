"""restconsumer test suite."""
