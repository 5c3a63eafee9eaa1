"""Sans-IO routing: topics, sessions, fan-out into outbound buffers. Never touches a socket."""
