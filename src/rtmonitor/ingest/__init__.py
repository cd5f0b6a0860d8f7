"""Receivers: the gRPC servicer, packet validation and the generated protocol code."""
