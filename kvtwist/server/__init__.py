"""The network side: the wire protocol, the factory and its limits, the listening service."""
