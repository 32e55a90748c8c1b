"""Fault injection for tests: network outages (`tcp_proxy.TcpProxy`)."""
