"""broker-bench: the load generator and report for the broker's benchmarks (docs/benchmarks.md).

Owns the scenarios (idle, fanout, latency, ceiling, pollers), the client side of wire protocol
v1 as the load needs it, and a trivial server that shows the generator's own ceiling. Nothing in the
server imports this package; it talks to a broker only over loopback sockets and reads the
broker's /proc entries for RSS and CPU.

Layout (data flows top to bottom):
  __main__   command line, target selection, tables and JSON
  scenarios  one function per scenario: start workers, publish, collect, compute figures
  pollers    epoll vs poll vs select brokers beside a growing idle crowd, and its PNG plot
  workers    subscriber processes: raw non-blocking sockets on select.epoll, counting markers
  publisher  the one publishing connection (closed-loop window or fixed rate)
  target     spawn/stop servers by PID, /proc readers, the 127.0.0.0/8 guard
  wire       sans-IO client frames, handshake, payload marker scanning
  trivial    the ceiling server (protocol v1 subset; encodes once, one send per subscriber)
"""
